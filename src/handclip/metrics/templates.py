"""Gallery templates and case probes: several photos of one person scored as one.

* A person's **mean template** is the L2-normalised mean of their L2-normalised embeddings (the convention of
  face-recognition toolkits: insightface's IJB templates, bob.bio's default). With one photo it is that photo.
* A **case** is a set of photos of one unknown person, probed as one: ``case_mean`` scores its mean template
  (as above), ``case_max`` scores each gallery person as the best score of any of its photos.
* For calibration (:func:`calibration_cases`), a val identity's photos (in their order) are cut into cases of
  :data:`CASE_SIZE` consecutive photos (:func:`fixed_size_cases`), and a case short of :data:`CASE_SIZE` photos
  is filled with that identity's first training photos (always leaving one in the gallery), which then leave
  the gallery. The 11k and HD splits have one val photo per identity: without the filling, every case would be
  one photo and a case threshold would be a single photo's.

Pure functions on tensors (no files, no model): identify, eval and the calibration use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Photos per case when val images are grouped into cases for calibration.
CASE_SIZE = 3


def mean_templates(features: torch.Tensor, labels: torch.Tensor, block: int = 65536
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(templates (I, D) float32, labels (I,) ascending): one mean template per distinct label.

    Each row is L2-normalised first (in float64, ``block`` rows at a time: ``features`` may be a memory-mapped
    float16 gallery), the rows of a label are summed in their order (so that a template depends only on its own
    person's rows, whatever else the gallery holds) and the sum is L2-normalised."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=features.device)
    unique, column = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros((unique.numel(), features.shape[1]), dtype=torch.float64, device=features.device)
    for start in range(0, features.shape[0], block):
        rows = F.normalize(features[start:start + block].to(torch.float64), dim=1)
        sums.index_add_(0, column[start:start + block], rows)
    return F.normalize(sums, dim=1).to(torch.float32), unique


def fixed_size_cases(labels: torch.Tensor, size: int = CASE_SIZE) -> torch.Tensor:
    """(N,) case number of every row: the rows of each label, in their order, cut into groups of ``size``
    consecutive rows (the last group of a label holds the rest). Cases are numbered by first row."""
    if size < 1:
        raise ValueError(f"case size must be >= 1, got {size}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu().tolist()
    seen: dict[int, int] = {}
    keys: dict[tuple[int, int], int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(keys.setdefault((lab, n // size), len(keys)))
    return torch.tensor(out, dtype=torch.long)


def calibration_cases(val_labels: torch.Tensor, train_labels: torch.Tensor, size: int = CASE_SIZE
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(case of every val row (V,), case of every training row (T,), -1 for the rows that stay in the gallery).

    Val rows form cases as :func:`fixed_size_cases` makes them; each case with fewer than ``size`` photos takes
    the first training photos of its identity not taken yet (in their order), at most as many as it lacks and
    never the identity's last one."""
    val_case = fixed_size_cases(val_labels, size)
    val_l = torch.as_tensor(val_labels, dtype=torch.long).cpu().tolist()
    available: dict[int, list[int]] = {}
    for row, lab in enumerate(torch.as_tensor(train_labels, dtype=torch.long).cpu().tolist()):
        available.setdefault(lab, []).append(row)
    count: dict[int, int] = {}
    label: dict[int, int] = {}
    for c, lab in zip(val_case.tolist(), val_l):
        count[c] = count.get(c, 0) + 1
        label[c] = lab
    train_case = [-1] * sum(len(rows) for rows in available.values())
    for c in sorted(count):
        rows = available.get(label[c], [])
        take = rows[:max(0, min(size - count[c], len(rows) - 1))]
        del rows[:len(take)]
        for r in take:
            train_case[r] = c
    return val_case, torch.tensor(train_case, dtype=torch.long)


def case_templates(features: torch.Tensor, cases: torch.Tensor) -> torch.Tensor:
    """(C, D): the mean template of each case (cases numbered 0..C-1)."""
    templates, _ = mean_templates(features, cases)
    return templates


def case_max(table: torch.Tensor, cases: torch.Tensor) -> torch.Tensor:
    """(C, I): per case, the largest score of its rows in ``table`` (N, I) (cases numbered 0..C-1)."""
    cases = torch.as_tensor(cases, dtype=torch.long, device=table.device)
    num = int(cases.max()) + 1 if cases.numel() else 0
    out = torch.full((num, table.shape[1]), float("-inf"), dtype=table.dtype, device=table.device)
    return out.scatter_reduce_(0, cases.unsqueeze(1).expand_as(table), table, reduce="amax")


def case_labels(labels: torch.Tensor, cases: torch.Tensor) -> torch.Tensor:
    """(C,): the label of each case (the label of its rows)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    cases = torch.as_tensor(cases, dtype=torch.long, device=labels.device)
    out = torch.full((int(cases.max()) + 1,), -1, dtype=torch.long, device=labels.device)
    return out.scatter_(0, cases, labels)

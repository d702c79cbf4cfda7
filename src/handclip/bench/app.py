"""HandCLIP Studio under load (``bench.parts=[app]``): the app served by ``python -m handclip.app`` on a free
loopback port, concurrent clients through its HTTP API (gradio's Python client), every answer checked.

* **load**: ``clients`` clients x ``requests_per_client`` identify requests, one photo each, against a gallery of
  ``gallery`` photos; each photo is one of the gallery's own, so its answer is known: its person first, at score 1
  (the photo matches itself), its own file as the best match. p50/p95 latency of the answered requests.
* **enrol during identify**: ``race.rounds`` times a new person is enrolled (``race.photos`` photos) while
  ``race.clients`` clients identify exactly those photos again and again. Every answer must show the gallery before
  the enrolment (the person absent) or after it (the person first, at score 1, for every one of the photos), never
  a mix: a person with part of their photos, or an index that does not match the gallery.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handclip.bench.load import run_load
from handclip.errors import HandCLIPError
from handclip.utils.servers import local_server

Say = Callable[[str], None]

#: A score at or above this is a photo matching itself (float16 index: within ~5e-5 of 1).
SELF_SCORE = 0.999


# -- the gallery ---------------------------------------------------------------------------------------------
def photo_pixels(index: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A photo unlike every other: its own 6 x 6 pattern of light and dark cells over its own colour, with noise
    (a random-weight tiny ViT tells such photos apart: other photos score below 0.9995 against it)."""
    width, height = size
    rng = np.random.default_rng([seed, index, 23])
    pattern = rng.choice([-1.0, 1.0], size=(6, 6, 3))
    cells = np.kron(pattern, np.ones((-(-height // 6), -(-width // 6), 1)))[:height, :width]
    pixels = rng.uniform(50, 205, size=3) + 60 * cells + rng.normal(0, 10, size=cells.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_photo(path: Path, index: int, size: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_pixels(index, size, seed), "RGB").save(path, quality=95)
    return path


def person_name(n: int) -> str:
    return f"person{n:05d}"


def make_gallery(folder: Path, photos: int, per_identity: int, size: tuple[int, int], seed: int = 0
                 ) -> dict[str, list[Path]]:
    """``photos`` JPEGs, ``per_identity`` per person folder (``person00000/photo000000.jpg``, ...), written once
    and reused while ``folder/gallery.json`` says they were made with the same settings."""
    settings = {"photos": photos, "per_identity": per_identity, "size": list(size), "seed": seed}
    stamp = folder / ".gallery.json"
    layout = {person_name(i // per_identity): [] for i in range(photos)}
    for i in range(photos):
        layout[person_name(i // per_identity)].append(folder / person_name(i // per_identity) / f"photo{i:06d}.jpg")
    try:
        if json.loads(stamp.read_text()) == settings:
            return layout
    except (OSError, ValueError):
        pass
    if folder.exists():
        shutil.rmtree(folder)
    for i in range(photos):
        write_photo(layout[person_name(i // per_identity)][i % per_identity], i, size, seed)
    stamp.write_text(json.dumps(settings))
    return layout


# -- the model ----------------------------------------------------------------------------------------------
def zero_shot_model(models_root: Path, model_name: str, photos: list[Path], people: list[str], seed: int,
                    hand: str = "dorsal_right") -> Path:
    """The app's zero-shot model (``model_name``, random weights from ``seed``) with a calibration file computed
    on ``photos`` (each person's first photo against the others), where the app looks for it:
    ``<models_root>/eval/<hand>_zeroshot.calibration.json``."""
    import handclip
    from handclip.evaluation.calibration import calibration_from_embeddings, write_calibration

    model = handclip.load(model=model_name, seed=seed)
    features = model.embed(photos)
    labels = sorted(set(people))
    ids = np.array([labels.index(p) for p in people])
    first = np.array([i == 0 or people[i - 1] != people[i] for i in range(len(people))])
    calibration = calibration_from_embeddings(features[first], list(ids[first]), features[~first],
                                              list(ids[~first]))
    calibration["model_fingerprint"] = model.fingerprint
    return write_calibration(models_root / "eval" / f"{hand}_zeroshot.calibration.json", calibration)


def app_command(models_root: Path, galleries: list[Path], out: Path, model: str, seed: int,
                *extra: str) -> Callable[[int], list[str]]:
    """``python -m handclip.app`` on loopback with these folders (the command for :func:`local_server`)."""
    listed = ",".join(json.dumps(str(g)) for g in galleries)
    return lambda port: [sys.executable, "-m", "handclip.app", "host=127.0.0.1", f"port={port}", "model=tiny",
                         f"model.model_name={model}", f"seed={seed}", f"models_root={models_root}",
                         f"galleries=[{listed}]", f"out={out}", "device=cpu", *extra]


# -- requests and answers -----------------------------------------------------------------------------------
@dataclass
class Answer:
    """What an identify request got back: the page's messages, decision text and table rows, and the results
    file (results.json, fetched over HTTP as the page's download link does)."""

    messages: str
    decision: str
    rows: list[list]
    results: dict

    def rankings(self) -> list[list[dict]]:
        """Per photo, its top-k ``{identity, score, file, rank}`` (identify's records)."""
        return [q["top"] for q in self.results.get("queries", [])]


class StudioClient:
    """A gradio client of the app, with its model and gallery choices read from the page (the first model offered,
    ``gallery`` or the first gallery)."""

    def __init__(self, url: str, gallery: Path | None = None, timeout_s: float = 300.0):
        from gradio_client import Client

        self.url, self.timeout_s = url, timeout_s
        self.client = Client(url, verbose=False, download_files=False)
        props = {c["props"].get("elem_id"): c["props"] for c in self.client.config["components"]}
        models = props["model-select"].get("choices") or []
        if not models:
            raise HandCLIPError(f"the app at {url} offers no model")
        self.model = models[0][1]
        self.gallery = str(gallery) if gallery is not None else props["gallery-select"]["value"]

    def identify(self, photos: list[Path], top_k: int = 5) -> Any:
        from gradio_client import handle_file

        job = self.client.submit([handle_file(str(p)) for p in photos], self.model, self.gallery, top_k,
                                 "calibrated target", api_name="/identify")
        return job.result(timeout=self.timeout_s)

    def enrol(self, person: str, photos: list[Path]) -> str:
        from gradio_client import handle_file

        job = self.client.submit(self.gallery, person, [handle_file(str(p)) for p in photos], self.model,
                                 api_name="/enrol")
        return job.result(timeout=self.timeout_s)[0]

    def answer(self, raw: Any) -> Answer:
        """An identify answer read: the results file fetched from the link the page offers."""
        messages, decision, table, _tiles, files = raw
        results: dict = {}
        for file in files or []:
            if file["orig_name"] == "results.json":
                with urllib.request.urlopen(file["url"], timeout=self.timeout_s) as response:
                    results = json.loads(response.read())
        return Answer(messages or "", decision or "", (table or {}).get("data") or [], results)


def check_self_match(answer: Answer, person: str, photo: Path) -> str | None:
    """What is wrong with the answer to one gallery photo (None: its person first at score 1, its own file)."""
    if answer.messages.strip():
        return f"{photo.name}: the page says {answer.messages.strip()[:200]!r}"
    rankings = answer.rankings()
    if len(rankings) != 1 or not rankings[0]:
        return f"{photo.name}: expected one photo's ranking, got {len(rankings)}"
    first = rankings[0][0]
    if first["identity"] != person or first["score"] < SELF_SCORE or Path(first["file"]).name != photo.name:
        return (f"{photo.name}: first {first['identity']} {first['score']:.4f} ({Path(first['file']).name}), "
                f"expected {person} at 1.0 ({photo.name})")
    shown = {row[0] for row in answer.rows}
    top = [row for row in answer.rows if row[1] == 1]
    if shown != {photo.name} or len(top) != 1 or top[0][2] != person or f"**{person}**" not in answer.decision:
        return f"{photo.name}: the page's table or decision shows another photo or person: {answer.rows[:1]}"
    return None


def gallery_state(answer: Answer, person: str, count: int) -> str:
    """"before" (``person`` in no ranking), "after" (``person`` first at score 1 for each of the ``count`` photos),
    or "torn: ..." (anything else: part of the person's photos, an error, a missing ranking)."""
    rankings = answer.rankings()
    if answer.messages.strip() or len(rankings) != count:
        return f"torn: {len(rankings)} rankings for {count} photos; {answer.messages.strip()[:200]}"
    if not any(t["identity"] == person for ranking in rankings for t in ranking):
        return "before"
    full = [ranking[0]["identity"] == person and ranking[0]["score"] >= SELF_SCORE for ranking in rankings]
    if all(full):
        return "after"
    return f"torn: {person} first at score 1 for {sum(full)} of {count} photos"


# -- the two phases ------------------------------------------------------------------------------------------
def load_phase(url: str, gallery: dict[str, list[Path]], clients: int, per_client: int, timeout_s: float) -> dict:
    """``clients`` x ``per_client`` identify requests, each a gallery photo of another person (every photo asked
    once at most), its answer checked (:func:`check_self_match`)."""
    people = sorted(gallery)
    count = clients * per_client
    requests = [(people[i % len(people)], gallery[people[i % len(people)]][(i // len(people))
                 % len(gallery[people[i % len(people)]])]) for i in range(count)]
    run = run_load(lambda: StudioClient(url, timeout_s=timeout_s), requests, clients,
                   send=lambda c, r: (c, c.identify([r[1]])),
                   check=lambda r, a: check_self_match(a[0].answer(a[1]), *r), timeout_s=timeout_s)
    return {"clients": clients, "requests_per_client": per_client, **run.summary()}


def race_phase(url: str, rounds: int, photos: list[list[Path]], clients: int, timeout_s: float) -> dict:
    """``rounds`` enrolments of a new person (``photos[r]``, their photos) while ``clients`` clients identify those
    photos again and again; every answer classified by :func:`gallery_state`."""
    states: dict[str, int] = {"before": 0, "after": 0, "torn": 0, "stale": 0, "enrol_failed": 0}
    problems: list[str] = []
    enrol_s: list[float] = []
    deadline = time.perf_counter() + timeout_s
    for r in range(rounds):
        person = f"enrolled{r:03d}"
        seen: list[tuple[float, float, str]] = []  # (sent, answered, state)
        lock, stop = threading.Lock(), threading.Event()

        def identify_loop() -> None:
            client = StudioClient(url, timeout_s=timeout_s)
            while not stop.is_set() and time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    state = gallery_state(client.answer(client.identify(photos[r])), person, len(photos[r]))
                except Exception as e:  # noqa: BLE001 - a failed request during an enrolment is a torn view
                    state = f"torn: {type(e).__name__}: {e}"
                with lock:
                    seen.append((sent, time.perf_counter(), state))

        def answers() -> int:
            with lock:
                return len(seen)

        threads = [threading.Thread(target=identify_loop, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        while answers() < clients and time.perf_counter() < deadline:  # identify is running when the enrolment starts
            time.sleep(0.05)
        enrolling = StudioClient(url, timeout_s=timeout_s)
        started = time.perf_counter()
        status = enrolling.enrol(person, photos[r])
        finished = time.perf_counter()
        enrol_s.append(finished - started)
        if f"{len(photos[r])} photo(s) added" not in status.replace("\\", ""):  # the page's Markdown escapes
            states["enrol_failed"] += 1
            problems.append(f"{person}: enrolment said {status!r}")
        while (sum(s > finished for s, _, _ in list(seen)) < clients) and time.perf_counter() < deadline:
            time.sleep(0.05)  # requests sent after the enrolment ended must see it
        stop.set()
        for t in threads:
            t.join(timeout_s)
        for sent, _, state in seen:
            if state.startswith("torn"):
                states["torn"] += 1
                problems.append(f"{person}: {state}")
            elif state == "before" and sent > finished:
                states["stale"] += 1
                problems.append(f"{person}: a request sent after the enrolment ended does not see it")
            else:
                states[state] += 1
    return {"rounds": rounds, "photos_per_person": len(photos[0]) if photos else 0, "clients": clients,
            "answers": states, "consistent": states["torn"] == states["stale"] == states["enrol_failed"] == 0,
            "saw_both": states["before"] > 0 and states["after"] > 0, "problems": problems[:5],
            "enrol_s": [round(s, 3) for s in enrol_s]}


# -- the benchmark part --------------------------------------------------------------------------------------
def _peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def bench_app(s: dict, scratch: Path, seed: int, say: Say, env: dict[str, str] | None = None) -> dict:
    """The app on a gallery of ``s['gallery']`` photos (``s['per_identity']`` per person) and the model
    ``s['model_name']`` (zero-shot, random weights from ``seed``): one client alone (``solo_requests`` requests:
    the latency without queueing), :func:`load_phase`, then :func:`race_phase`.
    Everything lives under ``scratch/app`` (photos generated once; the run's gallery copy, model calibration and
    app folder made afresh, so the first request builds the gallery's index). ``env``: the server's environment."""
    from importlib.metadata import version

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of the clients
    size = (int(s["image_size"][0]), int(s["image_size"][1]))
    count, per = int(s["gallery"]), int(s["per_identity"])
    root = scratch / "app"
    photos = make_gallery(root / f"photos-{count}-{per}-{size[0]}x{size[1]}-seed{seed}", count, per, size, seed)
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    gallery = run / "gallery"
    layout = {p: [gallery / p / f.name for f in files] for p, files in photos.items()}
    for person, files in photos.items():
        (gallery / person).mkdir(parents=True)
        for src, dst in zip(files, layout[person]):
            shutil.copyfile(src, dst)
    calib_people = sorted(layout)[:100]
    say(f"  gallery: {count:,} photos of {len(layout):,} people ({size[0]}x{size[1]}); calibrating the zero-shot "
        f"{s['model_name']} on {len(calib_people)} of them ...")
    zero_shot_model(run / "models", s["model_name"], [f for p in calib_people for f in layout[p]],
                    [p for p in calib_people for _ in layout[p]], seed)
    race = s["race"]
    newcomers = [[write_photo(run / "newcomers" / f"round{r}" / f"new{j:02d}.jpg", count + r * 1000 + j, size, seed)
                  for j in range(int(race["photos"]))] for r in range(int(race["rounds"]))]
    timeout = float(s["timeout_s"])
    command = app_command(run / "models", [gallery], run / "out", s["model_name"], seed)
    result: dict[str, Any] = {"gallery_photos": count, "people": len(layout), "image_size": list(size),
                              "model_name": s["model_name"], "gradio": version("gradio")}
    started = time.perf_counter()
    with local_server(command, run / "server.log", env=env, timeout=timeout) as server:
        result["server_start_s"] = round(time.perf_counter() - started, 2)
        client = StudioClient(server.url, gallery.resolve(), timeout)
        person = sorted(layout)[0]
        started = time.perf_counter()
        answer = client.answer(client.identify([layout[person][0]]))
        result["first_request_s"] = round(time.perf_counter() - started, 2)  # the gallery's index built
        wrong = check_self_match(answer, person, layout[person][0])
        if wrong:
            raise HandCLIPError(f"the app's first answer is wrong: {wrong}")
        say(f"  server up in {result['server_start_s']} s, first request (index of {count:,} photos built) "
            f"{result['first_request_s']} s; {s['solo_requests']} requests of one client alone ...")
        result["solo"] = load_phase(server.url, layout, 1, int(s["solo_requests"]), timeout)
        say(f"  alone: latency p50 {result['solo']['latency_ms']['p50']} ms; {s['clients']} clients x "
            f"{s['requests_per_client']} requests ...")
        result["load"] = load_phase(server.url, layout, int(s["clients"]), int(s["requests_per_client"]), timeout)
        say(f"  {result['load']['right']}/{result['load']['requests']} right, latency p50 "
            f"{result['load']['latency_ms']['p50']} ms, p95 {result['load']['latency_ms']['p95']} ms; "
            f"{race['rounds']} enrolments during identify ...")
        result["race"] = race_phase(server.url, int(race["rounds"]), newcomers, int(race["clients"]), timeout)
        result["server_peak_rss_mb"] = _peak_rss_mb(server.process.pid)
    load = result["load"]
    load["all_right"] = load["right"] == load["requests"] and result["solo"]["right"] == result["solo"]["requests"]
    result["race"]["consistent_and_seen"] = result["race"]["consistent"] and result["race"]["saw_both"]
    return result

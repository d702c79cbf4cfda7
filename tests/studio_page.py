"""HandCLIP Studio's page driven as a person does, in headless Chromium (Playwright): the browser test and
tests/screenshot.py (docs/studio.png) share these steps. Components are found by their elem_id
(handclip/app/ui.py lists them)."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect

#: Seconds a step may take on a busy 2-core machine (model loading and the first index build included).
STEP_S = 240


def open_studio(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#identify-run")).to_be_visible(timeout=STEP_S * 1000)


def upload(page: Page, elem_id: str, photos: list[Path]) -> None:
    """Put ``photos`` into a file component and wait until each is on the server (its download link shown)."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files([str(p) for p in photos])
    expect(page.locator(f"#{elem_id} a[href*='gradio_api/file=']")).to_have_count(len(photos),
                                                                                  timeout=STEP_S * 1000)


def enrol(page: Page, person: str, photos: list[Path]) -> str:
    """Enrol ``person`` with ``photos`` in the chosen gallery; the status line the page shows."""
    page.get_by_role("tab", name="Enrol").click()
    page.locator("#enrol-name textarea, #enrol-name input").first.fill(person)
    upload(page, "enrol-upload", photos)
    page.locator("#enrol-run").click()
    status = page.locator("#enrol-status")
    expect(status).to_contain_text(f"{person}: ", timeout=STEP_S * 1000)
    return status.inner_text()


def table(page: Page, elem_id: str) -> list[list[str]]:
    """The rows of a Dataframe (its header first), as shown."""
    rows = page.locator(f"#{elem_id}").get_by_role("row")
    return [[cell.inner_text().strip() for cell in rows.nth(i).get_by_role("columnheader").all()
             + rows.nth(i).get_by_role("gridcell").all()] for i in range(rows.count())]


def identify(page: Page, photos: list[Path], expect_text: str) -> tuple[str, list[list[str]]]:
    """Identify ``photos``; wait until the decision shows ``expect_text``; (decision text, table rows)."""
    page.get_by_role("tab", name="Identify").click()
    upload(page, "identify-upload", photos)
    page.locator("#identify-run").click()
    decision = page.locator("#identify-decision")
    expect(decision).to_contain_text(expect_text, timeout=STEP_S * 1000)
    first_cell = page.locator("#identify-table").get_by_role("gridcell").first  # the table of this request
    expect(first_cell).to_have_text(photos[0].name, timeout=STEP_S * 1000)
    return decision.inner_text(), table(page, "identify-table")

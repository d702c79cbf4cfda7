"""The page: gradio Blocks with the Identify, Enrol, Batch and Explore tabs over a :class:`~handclip.app.engine.Studio`.

Element ids (stable: the browser tests find the components by them):

    model-select, models-refresh, gallery-select                    the model and gallery (above the tabs)
    tab-identify, tab-enrol, tab-batch, tab-explore                 the tabs
    identify-upload, identify-topk, identify-fmr,                   Identify: photos in, options,
    identify-gallery-mode, identify-run                             best photo or mean template; the button
    identify-fusion, identify-hand                                  across hand types (off | mean | max) and the
                                                                    photos' hand type (auto | a hand type)
    identify-decision, identify-table, identify-gallery,            the decision per photo, top-k table, thumbnails
    identify-download, identify-messages                            results.csv/json, refused photos
    enrol-name, enrol-upload, enrol-run, enrol-status,              Enrol: add a person (or more photos of them)
    enrol-people, enrol-person, enrol-photo,                        who is in the gallery; pick a person / photo
    enrol-remove-photo, enrol-remove-person                         remove them
    batch-upload, batch-folder, batch-run,                          Batch: many photos (or a folder),
    batch-status, batch-table, batch-download                       one table and one CSV
    explore-run, explore-table, explore-pictures                    Explore: evaluation results of the model
"""

from __future__ import annotations

import logging
import re

import gradio as gr
import pandas as pd

from handclip.app.decisions import describe, percent
from handclip.app.engine import Request, Studio
from handclip.app.fusion import FUSED_HEADERS, FUSIONS, HANDS, fused_rows, fused_text
from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)

FMR_CHOICES = ["calibrated target", "0.1", "0.01", "0.001", "0.0001"]
TABLE_HEADERS = ["photo", "rank", "person", "score", "decision", "zone"]
BATCH_HEADERS = ["photo", "decision", "score", "zone", "top-k"]
#: identify's gallery modes: (shown, value)
GALLERY_MODES = [("their best photo (max)", "max"), ("their mean template (mean)", "mean")]
#: Requests that may wait in gradio's queue; more are refused ("queue is full") instead of piling up.
QUEUE_SIZE = 256


def md_escape(text: str) -> str:
    """Text shown in Markdown as it is (a client's file name or a person's name)."""
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", str(text))


def _fmr(value: str | None) -> float | None:
    return None if value in (None, "", FMR_CHOICES[0]) else float(value)


def _error_text(err: BaseException) -> str:
    if isinstance(err, HandCLIPError):
        return f"⚠ {md_escape(err)}"
    log.exception("request failed")
    return f"⚠ the request failed ({type(err).__name__}); the server log has the details"


def _offered(studio: Studio, gallery_label: str | None) -> bool:
    """Whether the fusion choice is shown for the gallery (a hand-type gallery with a model per hand type)."""
    try:
        return studio.fusion(gallery_label) is not None
    except Exception as err:  # noqa: BLE001 - not offered; the page goes on
        log.warning("fusion not offered: %s", err)
        return False


def build(studio: Studio) -> gr.Blocks:
    """The Blocks of the app (not launched)."""
    models = [m.label for m in studio.models]
    with gr.Blocks(title="HandCLIP Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
        gr.Markdown("# HandCLIP Studio\nIdentify people from photos of their hands against a gallery; enrol people.")
        with gr.Row():
            model = gr.Dropdown(models, value=models[0] if models else None, label="Model", elem_id="model-select",
                                scale=4, allow_custom_value=True)  # the server checks it against its own list
            refresh = gr.Button("↻ models", elem_id="models-refresh", scale=0)
            gallery = gr.Dropdown(studio.gallery_labels, value=studio.default_gallery(models[0] if models else None),
                                  label="Gallery", elem_id="gallery-select", scale=4)
        offered = _offered(studio, gallery.value)
        with gr.Tab("Identify", elem_id="tab-identify"):
            with gr.Row():
                photos = gr.File(file_count="multiple", type="filepath", label="Photos (drop one or more)",
                                 elem_id="identify-upload")
                with gr.Column():
                    top_k = gr.Slider(1, 20, value=studio.top_k, step=1, label="top-k people", elem_id="identify-topk")
                    chosen = FMR_CHOICES[0] if studio.target_fmr is None else f"{studio.target_fmr:g}"
                    fmr = gr.Dropdown(list(dict.fromkeys([*FMR_CHOICES, chosen])), value=chosen,
                                      label="Decision threshold at false-match rate", elem_id="identify-fmr")
                    mode = gr.Radio(GALLERY_MODES, value="max", label="A person scores as",
                                    elem_id="identify-gallery-mode")
                    fusion = gr.Radio(list(FUSIONS), value="off", label="Across hand types (fused models)",
                                      elem_id="identify-fusion", visible=offered)
                    hand = gr.Dropdown(list(HANDS), value="auto", label="Hand type of the photos",
                                       elem_id="identify-hand", visible=offered)
                    run = gr.Button("Identify", variant="primary", elem_id="identify-run")
            messages = gr.Markdown(elem_id="identify-messages")
            decision = gr.Markdown(elem_id="identify-decision")
            table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="identify-table")
            tiles = gr.Gallery(label="Photo and best-matching gallery photos", columns=6, height="auto",
                               elem_id="identify-gallery")
            download = gr.File(label="Results (CSV, JSON)", file_count="multiple", interactive=False,
                               elem_id="identify-download")
        with gr.Tab("Enrol", elem_id="tab-enrol"):
            with gr.Row():
                with gr.Column():
                    name = gr.Textbox(label="Person's name", elem_id="enrol-name")
                    new_photos = gr.File(file_count="multiple", type="filepath", label="Their photos",
                                         elem_id="enrol-upload")
                    enrol = gr.Button("Enrol", variant="primary", elem_id="enrol-run")
                with gr.Column():
                    status = gr.Markdown(elem_id="enrol-status")
                    listing = gr.Dataframe(headers=["person", "photos"], interactive=False, elem_id="enrol-people")
                    # the choices change with the gallery; the server acts only on names it lists itself
                    person = gr.Dropdown([], label="Person", elem_id="enrol-person", allow_custom_value=True)
                    photo = gr.Dropdown([], label="Photo", elem_id="enrol-photo", allow_custom_value=True)
                    with gr.Row():
                        drop_photo = gr.Button("Remove photo", elem_id="enrol-remove-photo")
                        drop_person = gr.Button("Remove person", variant="stop", elem_id="enrol-remove-person")
        with gr.Tab("Batch", elem_id="tab-batch"):
            with gr.Row():
                batch_files = gr.File(file_count="multiple", type="filepath", label="Photos (many at once)",
                                      elem_id="batch-upload")
                batch_folder = gr.File(file_count="directory", type="filepath", label="... or a folder",
                                       elem_id="batch-folder")
            batch_run = gr.Button("Identify all", variant="primary", elem_id="batch-run")
            batch_status = gr.Markdown(elem_id="batch-status")
            batch_table = gr.Dataframe(headers=BATCH_HEADERS, interactive=False, elem_id="batch-table")
            batch_download = gr.File(label="Results (CSV, JSON)", file_count="multiple", interactive=False,
                                     elem_id="batch-download")
        with gr.Tab("Explore", elem_id="tab-explore"):
            explore = gr.Button("Show the evaluation of this model", elem_id="explore-run")
            explore_table = gr.Markdown(elem_id="explore-table")
            explore_pictures = gr.Gallery(label="CMC, ROC/DET, rankings", columns=2, height="auto",
                                          elem_id="explore-pictures")

        def identify(files, model_label, gallery_label, k, fmr_value, gallery_mode="max", fused="off",
                     hand_type="auto", progress=gr.Progress()):
            try:
                request = Request(model_label, gallery_label, int(k), _fmr(fmr_value), gallery_mode or "max",
                                  fused or "off", hand_type or "auto")
                progress(0.1, desc="checking and embedding the photos")
                outcome = studio.identify(files, request)
                notes = "\n".join(f"- ⚠ {md_escape(m)}" for m in outcome.messages)
                if outcome.result is None:
                    return notes, "", [], [], None
                files_out = [str(outcome.files["csv"]), str(outcome.files["json"])]
                if request.fused:  # identify_fused's records: fused score, hand types used, decision
                    labels = [md_escape(label) for label in outcome.labels]
                    table = pd.DataFrame(fused_rows(outcome.labels, outcome.records), columns=FUSED_HEADERS)
                    return (notes, fused_text(outcome.result, labels), table, studio.tiles(outcome, request),
                            files_out)
                b = outcome.band
                rows = [[label, t["rank"], t["identity"], round(t["score"], 4),
                         r["decision"] if t["rank"] == 1 else "", b.zone(t["score"])]
                        for label, r in zip(outcome.labels, outcome.records) for t in r["top"]]
                head = (f"Threshold {b.threshold:.4f} at FMR {percent(b.fmr)}; grey zone {b.low:.4f} – {b.high:.4f} "
                        f"(FMR {percent(b.low_fmr)} – {percent(b.high_fmr)})\n\n")
                text = head + "\n".join(f"- {md_escape(label)}: {describe(r, b)}"
                                        for label, r in zip(outcome.labels, outcome.records))
                progress(0.9, desc="thumbnails")
                return notes, text, rows, studio.tiles(outcome, request), files_out
            except Exception as err:  # noqa: BLE001 - a message on the page; the server keeps running
                return _error_text(err), "", [], [], None

        def batch(files, folder, model_label, gallery_label, k, fmr_value, gallery_mode="max", fused="off",
                  hand_type="auto", progress=gr.Progress()):
            try:
                files = [*(files or []), *(folder or [])]
                request = Request(model_label, gallery_label, int(k), _fmr(fmr_value), gallery_mode or "max",
                                  fused or "off", hand_type or "auto")
                outcome = studio.identify(files, request, max_files=studio.limits.max_batch_files, chunk=32,
                                          progress=lambda done, total: progress((done, total), desc="photos"))
                notes = "\n".join(f"- ⚠ {md_escape(m)}" for m in outcome.messages)
                if outcome.result is None:
                    return notes, [], None
                b = outcome.band
                rows = [[label, r["decision"], round(r["score"], 4), b.zone(r["score"]) if b else "fused",
                         "; ".join(f"{t['identity']} {t['score']:.3f}" for t in r["top"])]
                        for label, r in zip(outcome.labels, outcome.records)]
                done = f"{len(rows)} photo(s) identified ({sum(r['accepted'] for r in outcome.records)} known)"
                return "\n".join([done, notes]), rows, [str(outcome.files["csv"]), str(outcome.files["json"])]
            except Exception as err:  # noqa: BLE001
                return _error_text(err), [], None

        def listed(gallery_label, chosen=None):
            try:
                everyone = studio.people(gallery_label) if gallery_label else {}
            except Exception as err:  # noqa: BLE001
                log.warning("cannot list the gallery: %s", err)
                everyone = {}
            keep = chosen if chosen in everyone else None
            return ([[p, len(f)] for p, f in everyone.items()], gr.update(choices=list(everyone), value=keep),
                    gr.update(choices=everyone.get(keep, []), value=None))

        def do_enrol(gallery_label, who, files, model_label, progress=gr.Progress(track_tqdm=True)):
            try:
                progress(0.05, desc="checking the photos")
                text = md_escape(studio.enrol(gallery_label, who, files, model_label))
            except Exception as err:  # noqa: BLE001
                text = _error_text(err)
            return (text, *listed(gallery_label, (who or "").strip()))

        def do_remove_photo(gallery_label, who, which, model_label, progress=gr.Progress(track_tqdm=True)):
            try:
                text = md_escape(studio.remove_photo(gallery_label, who or "", which or "", model_label))
            except Exception as err:  # noqa: BLE001
                text = _error_text(err)
            return (text, *listed(gallery_label, who))

        def do_remove_person(gallery_label, who, model_label, progress=gr.Progress(track_tqdm=True)):
            try:
                text = md_escape(studio.remove_person(gallery_label, who or "", model_label))
            except Exception as err:  # noqa: BLE001
                text = _error_text(err)
            return (text, *listed(gallery_label))

        def photos_of(gallery_label, who):
            try:
                return gr.update(choices=studio.people(gallery_label).get(who, []), value=None)
            except Exception:  # noqa: BLE001
                return gr.update(choices=[], value=None)

        def show_evaluation(model_label):
            try:
                return studio.evaluation(model_label)
            except Exception as err:  # noqa: BLE001
                return _error_text(err), []

        # appended last (defaults for callers that leave them out): the mode ("max"), fusion ("off"), hand ("auto")
        common = [model, gallery, top_k, fmr, mode, fusion, hand]
        run.click(identify, [photos, *common], [messages, decision, table, tiles, download],
                  api_name="identify")
        batch_run.click(batch, [batch_files, batch_folder, *common], [batch_status, batch_table, batch_download],
                        api_name="batch")
        enrolled = [status, listing, person, photo]
        enrol.click(do_enrol, [gallery, name, new_photos, model], enrolled, api_name="enrol")
        drop_photo.click(do_remove_photo, [gallery, person, photo, model], enrolled, api_name="remove_photo")
        drop_person.click(do_remove_person, [gallery, person, model], enrolled, api_name="remove_person")
        person.change(photos_of, [gallery, person], [photo], api_name=False)
        gallery.change(listed, [gallery], [listing, person, photo], api_name=False)
        gallery.change(lambda g: [gr.update(visible=_offered(studio, g), value=v) for v in ("off", "auto")],
                       [gallery], [fusion, hand], api_name=False)
        page.load(listed, [gallery], [listing, person, photo], api_name=False)
        explore.click(show_evaluation, [model], [explore_table, explore_pictures], api_name="explore")
        refresh.click(lambda: gr.update(choices=studio.refresh()), None, [model], api_name=False)
    # one request of each kind at a time (the model runs on every core); waiting requests bounded
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return page

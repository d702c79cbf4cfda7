"""HandCLIP Studio: a local web app (gradio) to identify hand photos against a gallery and to enrol people.

    python -m handclip.app                       # http://127.0.0.1:7860 (make app: on the demo after make demo)
    python -m handclip.app host=0.0.0.0 auth=USER:PASSWORD port=8080

Modules: :mod:`~handclip.app.settings` (address, login, caps, served folders), :mod:`~.uploads` (photos checked
by content), :mod:`~.gallery` (enrol and remove, locked and atomic), :mod:`~.models` (which models),
:mod:`~.decisions` (threshold and grey zone), :mod:`~.engine` (what the tabs do), :mod:`~.ui` (the page and its
element ids), :mod:`~.server` (the served application).
"""

"""HandCLIP Studio: identify hand photos and enrol people in a local web page (gradio).

    python -m handclip.app                                   # http://127.0.0.1:7860
    python -m handclip.app experiment=demo                   # the demo's model and galleries (make app)
    python -m handclip.app host=0.0.0.0 auth=USER:PASSWORD   # other machines: only with a login

Options: configs/app.yaml; the tabs and the security defaults: README.md, "HandCLIP Studio".
"""

from omegaconf import DictConfig

from handclip.command_line import hydra_entry


@hydra_entry("app")
def main(cfg: DictConfig) -> None:
    from handclip.app.server import serve  # gradio, torch and open_clip: after the command line is checked

    serve(cfg)


if __name__ == "__main__":
    main()

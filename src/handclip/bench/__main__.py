"""Speed and memory benchmark -> benchmarks/results/<device>.json (see benchmarks/README.md).

    python -m handclip.bench                      # full run
    python -m handclip.bench bench.quick=true     # seconds -> <device>-quick.json
"""

from omegaconf import DictConfig

from handclip.command_line import hydra_entry


@hydra_entry("bench")
def main(cfg: DictConfig) -> None:
    from handclip.bench.run import run_benchmark  # torch: after the command line is checked

    run_benchmark(cfg)


if __name__ == "__main__":
    main()

"""`python -m trainer --config trial.yaml [--set key.path=value ...] [--resume]`: one trial, no Ray.

Writes config.yaml, metrics.jsonl, checkpoints/ and final_metrics.json into runtime.output_dir.
Bad input (config, data, weights, checkpoint) ends with a one-line error and exit code 2; a
diverged run (non-finite loss) with exit code 3. A SIGTERM (a preemption notice) ends the step in
flight, writes its checkpoint and exits with code 75 (`trainer.engine.preemption`): `--resume` continues.
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.engine import preemption
from trainer.errors import NonFiniteLossError, TrainerError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="trial YAML (omitted: all defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.base_lr=0.01 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N iterations")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("trainer")
    preemption.install()
    try:
        from trainer.config import config_to_dict, load_config

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        from trainer.engine.train_loop import train
        from trainer.engine.reporters import ConsoleReporter, JsonlReporter

        with preemption.armed():  # a SIGTERM while the model is built still stops at the first step
            result = train(cfg, reporters=[ConsoleReporter(), JsonlReporter()], resume=args.resume,
                           stop_after=args.stop_after)
    except preemption.PreemptedError as exc:
        log.warning("%s (rerun with --resume)", exc)
        return preemption.EXIT_PREEMPTED
    except NonFiniteLossError as exc:
        log.error("diverged: %s", exc)
        return 3
    except TrainerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted; rerun with --resume to continue from the last checkpoint")
        return 130
    aps = {k: round(v, 4) for k, v in result.final_metrics.items() if k in ("bbox/AP", "segm/AP", "keypoints/AP", "voc/mAP")}
    log.info("%s at iteration %d %s -> %s", result.status, result.iterations, aps, result.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The lm-evaluation-harness command line with the `lflm` model registered.

lm-eval 0.4.13 discovers models only by import (it has no plugin entry point), so plain
`lm_eval --model lflm` cannot see ours; this is the same CLI, same arguments:

    lflm-lm-eval --model lflm --model_args run=runs/cola_tiny --tasks my_task --include_path tasks/
    python -m lflm_dist.eval.lm_eval_cli --model lflm ...
"""
import sys

import lflm_dist.eval.harness  # noqa: F401  (registers the "lflm" model)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()

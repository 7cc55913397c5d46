"""`trl-bapo`: train with BAPO from a YAML recipe, the way `trl grpo` trains with GRPO.

    trl-bapo --config recipes/demo.yaml
    trl-bapo --config recipes/countdown.yaml --accelerate_config zero3

As `trl grpo`, it starts `accelerate launch` itself and runs the training script (`trl_bapo.scripts.bapo`) in every
process. Arguments that no dataclass of the script knows go to `accelerate launch` (`--num_processes 8`,
`--multi_gpu`), and `--accelerate_config` takes a file or the name of a config TRL ships (`multi_gpu`, `zero2`,
`zero3`, `fsdp2`, ...). Run under `accelerate launch -m trl_bapo.cli`, it trains in the processes accelerate
started.
"""

from __future__ import annotations

import os
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from trl.cli.accelerate_config import resolve_accelerate_config_argument
from trl.cli.commands.training import _subtract_subsequence

from trl_bapo.scripts import bapo

SCRIPT = "trl_bapo.scripts.bapo"


def launch_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits `argv` into `accelerate launch`'s arguments and the training script's, as `trl grpo` does (trl
    1.16.0, `trl.cli.commands.training`): what the script's parser leaves over, on the command line or in the
    YAML, is accelerate's."""
    *_, config_remaining, cli_remaining = bapo.make_parser().parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    return resolve_accelerate_config_argument(config_remaining + cli_remaining), _subtract_subsequence(
        argv, cli_remaining
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Every launcher of `accelerate launch` sets this (accelerate 1.15, utils/launch.py): the processes exist.
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        bapo.main(argv)
        return 0
    launch_args, script_args = launch_arguments(argv)
    launch_command(launch_command_parser().parse_args([*launch_args, "--module", SCRIPT, *script_args]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

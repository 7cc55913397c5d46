"""`trl-bapo`: train with BAPO from a YAML recipe, the way `trl grpo` trains with GRPO.

    trl-bapo --config recipes/demo.yaml
    trl-bapo --config recipes/countdown.yaml --accelerate_config zero3

As `trl grpo`, it starts `accelerate launch` itself and runs the training script (`trl_bapo.scripts.bapo`) in every
process. Arguments that no dataclass of the script knows go to `accelerate launch` (`--num_processes 8`,
`--multi_gpu`), and `--accelerate_config` takes a file or the name of a config TRL ships (`multi_gpu`, `zero2`,
`zero3`, `fsdp2`, ...). Run under `accelerate launch -m trl_bapo.cli`, it trains in the processes accelerate
started.

A refusal (a setting, file or dataset trl-bapo cannot run with) ends with its message alone; a training process that
fails otherwise keeps its own traceback. Either way `trl-bapo` exits with the failed process's status (128 + the
signal for one killed by a signal, as a shell reports it), without the launcher's traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import signal
import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from trl.cli.accelerate_config import resolve_accelerate_config_argument
from trl.cli.commands.training import _subtract_subsequence

from trl_bapo.scripts import bapo

SCRIPT = "trl_bapo.scripts.bapo"


def launch_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits `argv` into `accelerate launch`'s arguments and the training script's, as `trl grpo` does (trl
    1.16.0, `trl.cli.commands.training`): what the script's parser leaves over, on the command line or in the
    YAML, is accelerate's."""
    parser = bapo.make_parser()
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    check_unknown_keys(parser, argv, config_remaining, cli_remaining)
    return resolve_accelerate_config_argument(config_remaining + cli_remaining), _subtract_subsequence(
        argv, cli_remaining
    )


def check_unknown_keys(parser, argv: list[str], config_remaining: list[str], cli_remaining: list[str]) -> None:
    """A key that neither the script nor `accelerate launch` knows is a typo: one line naming it, where it was
    written and the closest field, rather than accelerate's whole usage ending in "unrecognized arguments"."""
    actions = launch_command_parser()._actions  # argparse lists its options nowhere public
    known = {option.lstrip("-") for action in actions for option in action.option_strings} | {"accelerate_config"}
    fields = sorted({field.name for kind in parser.dataclass_types for field in dataclasses.fields(kind)})
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    for where, remaining in ((config, config_remaining), ("the command line", cli_remaining)):
        for key in (item[2:].split("=", 1)[0] for item in remaining if item.startswith("--")):
            if key not in known and key.replace("-", "_") not in known:
                closest = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean '{closest[0]}'?" if closest else "; see `trl-bapo --help`."
                raise SystemExit(f"trl-bapo: unknown key '{key}' in {where}{hint}")


def launch(launch_args: list[str], script_args: list[str]) -> int:
    """Runs the training script under `accelerate launch` and returns the exit status of its processes. The failed
    process has written its error already; the launchers' own tracebacks, which would follow it, are left out."""
    try:
        launch_command(launch_command_parser().parse_args([*launch_args, "--module", SCRIPT, *script_args]))
    except subprocess.CalledProcessError as failed:  # accelerate's launcher of one process (accelerate 1.15)
        return exit_status(failed.returncode)
    except ChildFailedError as failed:  # torch's elastic launcher, which accelerate uses for several processes
        return exit_status(failed.get_first_failure()[1].exitcode)
    return 0


def exit_status(returncode: int) -> int:
    """A process's exit status as a shell reports it; a process killed by a signal (the OOM killer's SIGKILL) has
    printed nothing, so this says which signal."""
    if returncode >= 0:
        return returncode
    print(f"trl-bapo: the training process was killed by {signal.Signals(-returncode).name}", file=sys.stderr)
    return 128 - returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with bapo.refusals_as_messages():
        # Every launcher of `accelerate launch` sets this (accelerate 1.15, utils/launch.py): the processes exist.
        if "ACCELERATE_MIXED_PRECISION" in os.environ:
            bapo.main(argv)
            return 0
        return launch(*launch_arguments(argv))


if __name__ == "__main__":
    raise SystemExit(main())

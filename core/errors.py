"""How a run ends when it does not finish: errors a user can cause (printed as one line, exit 2)
and the preempted exit code (a checkpoint was saved; requeue and resume)."""


# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": a training rank
# exits with it after a preemption checkpoint, and the batch script requeues the job on it.
PREEMPTED_EXIT_CODE = 75


class UserError(Exception):
    """A problem with the user's input: the message names the field or file and the fix."""

    exit_code = 2


def exit_on_user_error(main, *args, **kwargs):
    """Run `main`; a UserError becomes one line on stderr and exit code 2, no traceback."""
    import os
    import sys

    try:
        return main(*args, **kwargs)
    except UserError as err:
        # Under a multi-rank launcher every rank fails the same way; one line is enough.
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


def argument_parser(usage: str, **kwargs):
    """An argparse parser whose mistakes (unknown flag, missing argument) are UserErrors: one
    line that ends with `usage`, instead of argparse's own multi-line usage and exit."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(f"{message}: usage: {usage}")

    return Parser(**kwargs)

"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class MoefyError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check_at_least(minimum: int, **values: int | None) -> None:
    """Each named count the user gave (None: not given) is at least `minimum`; named as its CLI flag if not."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise MoefyError(f"--{name.replace('_', '-')} must be at least {minimum} (got {value})")

"""Placeholder until its issue lands: registers no command."""


def register(sub) -> None:
    return None

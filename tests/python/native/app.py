"""Needs a package with native extensions: `gust build` must refuse it."""

import gust


@gust.function
def handle(req: gust.Request) -> str:
    return "never built"

"""Uses a pure-Python package from requirements.txt: `gust build` bundles it."""

import six

import gust


@gust.function
def handle(req: gust.Request) -> dict:
    return {"six": six.__version__, "text": six.ensure_str(req.body)}

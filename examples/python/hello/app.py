"""The smallest Gust function in Python: greets whoever the body names.

    gust deploy examples/python/hello/app.py --name hello-py
    gust invoke hello-py --data Ada        # Hello, Ada!
"""

import gust


@gust.function
def handle(req: gust.Request) -> str:
    name = req.text().strip() or "world"
    return f"Hello, {name}!"

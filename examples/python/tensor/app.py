"""A two-layer perceptron on the host's device, without numpy: the Python
twin of examples/tensor-math.

    gust deploy examples/python/tensor/app.py --name mlp-py
    gust invoke mlp-py --content-type application/json \\
        --data '{"inputs": [[1, 2, 3, 4]]}'
"""

import gust

# Fixed weights keep the example self-contained: 4 inputs, 3 hidden, 2 out.
W1 = [[0.2, -0.1, 0.4], [0.5, 0.3, -0.2], [-0.3, 0.8, 0.1], [0.1, -0.4, 0.6]]
B1 = [0.1, 0.0, -0.1]
W2 = [[0.7, -0.5], [-0.2, 0.9], [0.4, 0.3]]
B2 = [0.0, 0.1]


@gust.function
def handle(req: gust.Request) -> dict:
    body = req.json()
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise gust.Error("invalid-input", 'expected {"inputs": [[x1, x2, x3, x4], ...]}', 400)
    x = gust.Tensor.from_list(inputs)
    hidden = (x @ gust.Tensor.from_list(W1) + gust.Tensor.from_list([B1])).relu()
    logits = hidden @ gust.Tensor.from_list(W2) + gust.Tensor.from_list([B2])
    probabilities = logits.softmax(-1)
    return {
        "probabilities": probabilities.to_list(),
        "classes": probabilities.argmax(-1).to_list(),
        "device": gust.devices()[0].backend,
    }

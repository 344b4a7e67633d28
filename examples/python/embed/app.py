"""Sentence similarity with a resident model (all-MiniLM-L6-v2): the Python
twin of examples/embed. Needs `scripts/fetch-models.sh` and a policy that
lists the model (the demo tenant's does).

    gust deploy examples/python/embed/app.py --name embed-py
    gust invoke embed-py --content-type application/json --data \\
        '{"sentences": ["A man is eating food.", "The movie was great."],
          "query": "someone having a meal"}'
"""

import gust

MODEL = "all-minilm-l6-v2"


@gust.function
def handle(req: gust.Request) -> dict:
    body = req.json()
    if not isinstance(body, dict) or not isinstance(body.get("sentences"), list):
        raise gust.Error("invalid-input", 'expected {"sentences": [...], "query": "..."}', 400)
    sentences = [str(s) for s in body["sentences"]]
    query = str(body.get("query", ""))
    model = gust.Model.load(MODEL)
    vectors = model.embed([query] + sentences)
    # The vectors are L2-normalised, so the dot product is the cosine.
    scores = [sum(a * b for a, b in zip(vectors[0], v)) for v in vectors[1:]]
    ranked = sorted(zip(sentences, scores), key=lambda pair: -pair[1])
    return {
        "model": model.name,
        "ranked": [{"sentence": s, "score": round(score, 4)} for s, score in ranked],
    }

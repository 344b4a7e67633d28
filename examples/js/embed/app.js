// Sentence similarity with a resident model (all-MiniLM-L6-v2): the
// JavaScript twin of examples/embed. Needs `scripts/fetch-models.sh` and a
// policy that lists the model (the demo tenant's does).
//
//     gust deploy examples/js/embed/app.js --name embed-js
//     gust invoke embed-js --content-type application/json --data \
//         '{"sentences": ["A man is eating food.", "The movie was great."],
//           "query": "someone having a meal"}'
import gust from "gust";

const MODEL = "all-minilm-l6-v2";

export default gust.fn((req) => {
  const body = req.json();
  if (!body || !Array.isArray(body.sentences)) {
    throw new gust.Error("invalid-input", 'expected {"sentences": [...], "query": "..."}', 400);
  }
  const sentences = body.sentences.map(String);
  const model = gust.Model.load(MODEL);
  const [query, ...vectors] = model.embed([String(body.query ?? ""), ...sentences]);
  // The vectors are L2-normalised, so the dot product is the cosine.
  const dot = (a, b) => a.reduce((sum, x, i) => sum + x * b[i], 0);
  const ranked = sentences
    .map((sentence, i) => ({ sentence, score: Math.round(dot(query, vectors[i]) * 1e4) / 1e4 }))
    .sort((a, b) => b.score - a.score);
  return { model: model.name, ranked };
});

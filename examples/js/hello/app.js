// A JavaScript Gust function: `gust deploy examples/js/hello/app.js`.
import gust from "gust";

export default gust.fn((req) => `Hello, ${req.text() || "world"}!`);

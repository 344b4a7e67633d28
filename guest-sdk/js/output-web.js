// `gust.emit` in a web app (`gust:function/http-guest`), whose world has no
// output stream: a web app streams through its response instead.
export function emit() {
  throw new TypeError("gust.emit is for functions; a web app (gust.http) answers with its Response");
}

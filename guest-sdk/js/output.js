// `gust.emit` in a function (`gust:function/guest`): the host's output
// stream. `gust build` points the SDK's `gust-output` import here.
export { emit } from "gust:function/output@0.1.0";

//! A hostile `wasi:http` component: before it responds it emits output
//! through `gust:function/output` (which only handler functions have a
//! caller for) in a loop, 1 MiB at a time. Nothing reads a wasi:http
//! function's emitted output, so the host must stop it rather than hold the
//! bytes.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    path: ["../../../wit", "wit"],
    world: "test:hostile-http/emits",
    generate_all,
});

wasip2::http::proxy::export!(HostileHttp);

struct HostileHttp;

impl wasip2::exports::http::incoming_handler::Guest for HostileHttp {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let piece = vec![7u8; 1 << 20];
        for _ in 0..100_000 {
            gust::function::output::emit(&piece);
        }
        let response = OutgoingResponse::new(Fields::new());
        let Ok(body) = response.body() else { return };
        ResponseOutparam::set(out, Ok(response));
        let _ = OutgoingBody::finish(body, None);
    }
}

//! `gust ws`: a WebSocket session with a function, one invocation per line
//! of input.

use std::io::Write;

use clap::Args;
use futures::{SinkExt as _, StreamExt as _};
use http::Method;
use http::header::AUTHORIZATION;
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::client::{Client, ClientError, ConnectArgs, KeyKind, empty, segment};

#[derive(Debug, Args)]
pub(crate) struct WsArgs {
    /// The function to talk to.
    pub(crate) name: String,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// Writes one message from the function, ending it with a newline unless
/// it has one.
fn print(out: &mut dyn Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes)?;
    if !bytes.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Sends each line of stdin as a text message and prints every message that
/// comes back, until stdin ends and the host has answered everything.
pub(crate) async fn ws(
    args: &WsArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let path = format!("/v1/functions/{}/ws", segment(&args.name));
    // The client's own request carries the URL and the key.
    let template = client.request(Method::GET, &path, empty())?;
    let uri = template.uri().clone();
    let authority = uri
        .authority()
        .ok_or_else(|| ClientError::Input("the URL has no host".to_owned()))?;
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let url = uri.to_string().replacen("http://", "ws://", 1);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Input(format!("bad WebSocket URL {url}: {e}")))?;
    if let Some(key) = template.headers().get(AUTHORIZATION) {
        request.headers_mut().insert(AUTHORIZATION, key.clone());
    }
    let unreachable = |reason: String| ClientError::Unreachable {
        url: url.clone(),
        reason,
    };
    let tcp = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                let body = response.body().clone().unwrap_or_default();
                ClientError::Api(Box::new(super::client::ApiError::from_parts(
                    response.status(),
                    response.headers(),
                    &body,
                )))
            }
            other => ClientError::Host(format!("WebSocket handshake failed: {other}")),
        })?;
    let (mut sink, mut messages) = socket.split();
    let sender = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if sink.send(Message::text(line)).await.is_err() {
                return;
            }
        }
        // The host answers every message before it reads the close.
        let _ = sink.close().await;
    });
    while let Some(message) = messages.next().await {
        match message {
            Ok(Message::Text(text)) => print(out, text.as_str().as_bytes())?,
            Ok(Message::Binary(bytes)) => print(out, &bytes)?,
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) => {
                sender.abort();
                return Err(ClientError::Host(format!("the WebSocket broke: {e}")));
            }
        }
    }
    sender.abort();
    Ok(())
}

//! gRPC through the gateway (`upstream.protocol: http2`): a tonic service behind the real
//! binary, over h2c and over TLS (h2 by ALPN), called by a tonic client. Unary and
//! bidirectional streaming calls, a non-OK status in the trailers, and the gateway's own
//! refusals as gRPC statuses.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use common::{certs::*, *};
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    codegen::{BoxFuture, BoxStream, StdError},
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

// ---------------------------------------------------------------- the service

/// `test.Echo`: `Unary` answers "<text> from <name>" (or NOT_FOUND for "missing"); `Chat`
/// answers each message as it comes, and ends with ABORTED and a trailer once it is sent
/// "end".
#[derive(Clone)]
struct Echo(&'static str);

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Unary(&'static str);

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFuture<tonic::Response<Msg>, Status>;
    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let name = self.0;
        Box::pin(async move {
            let text = req.into_inner().text;
            if text == "missing" {
                return Err(Status::not_found("no such echo"));
            }
            Ok(tonic::Response::new(Msg { text: format!("{text} from {name}") }))
        })
    }
}

struct Chat;

impl tonic::server::StreamingService<Msg> for Chat {
    type Response = Msg;
    type ResponseStream = BoxStream<Msg>;
    type Future = BoxFuture<tonic::Response<BoxStream<Msg>>, Status>;
    fn call(&mut self, req: tonic::Request<tonic::Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let mut inbound = req.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(m)) = inbound.message().await {
                    if m.text == "end" {
                        let mut s = Status::aborted("the end");
                        s.metadata_mut().insert("x-reason", MetadataValue::from_static("asked to end"));
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    if tx.send(Ok(Msg { text: format!("re: {}", m.text) })).await.is_err() {
                        return;
                    }
                }
            });
            let out: BoxStream<Msg> = Box::pin(ReceiverStream::new(rx));
            Ok(tonic::Response::new(out))
        })
    }
}

impl<B> tower_service::Service<http::Request<B>> for Echo
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let name = self.0;
        match req.uri().path() {
            "/test.Echo/Unary" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
                Ok(grpc.unary(Unary(name), req).await)
            }),
            "/test.Echo/Chat" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
                Ok(grpc.streaming(Chat, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The service on loopback, served by hyper's HTTP/2 server as tonic's own server would
/// serve it: h2c, or TLS with `leaf` offering h2 by ALPN.
async fn serve(name: &'static str, leaf: Option<&Leaf>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = leaf.map(|leaf| {
        let mut config = ServerConfig::clone(&leaf.server(None));
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    tower_service::Service::call(&mut Echo(name), req)
                });
                let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    None => h2.serve_connection(TokioIo::new(tcp), svc).await,
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => h2.serve_connection(TokioIo::new(stream), svc).await,
                        Err(_) => return,
                    },
                };
            });
        }
    });
    (addr, task)
}

// ---------------------------------------------------------------- the client

/// A gRPC client to the gateway at `gw`, naming `host` as its authority (the API's host).
async fn client(gw: &Gatehouse, host: &str) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", gw.addr))
        .unwrap()
        .origin(format!("http://{host}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn unary(grpc: &mut tonic::client::Grpc<Channel>, text: &str, key: Option<&str>) -> Result<String, Status> {
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(Msg { text: text.to_owned() });
    if let Some(k) = key {
        req.metadata_mut().insert("x-api-key", k.parse().unwrap());
    }
    let path = PathAndQuery::from_static("/test.Echo/Unary");
    grpc.unary(req, path, ProstCodec::<Msg, Msg>::default()).await.map(|r| r.into_inner().text)
}

fn grpc_api(name: &str, host: &str, upstream: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: /test.Echo/\n  stripListenPath: false\n  hosts: [{host}]\n  upstream:\n    url: \"{upstream}\"\n    protocol: http2\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_pass_over_h2c_and_tls_upstreams_with_streams_statuses_and_trailers() {
    let ca = Ca::new();
    let leaf = ca.leaf(&["127.0.0.1"]);
    let (h2c, _a) = serve("h2c", None).await;
    let (tls, _b) = serve("tls", Some(&leaf)).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            ca_secret("echo-ca", &ca.pem),
            grpc_api("h2c", "h2c.test", &format!("http://{h2c}"), ""),
            grpc_api("tls", "tls.test", &format!("https://{tls}"), "    tls: {caSecretRef: {name: echo-ca}}\n"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    for (host, name) in [("h2c.test", "h2c"), ("tls.test", "tls")] {
        let mut grpc = client(&gw, host).await;
        assert_eq!(unary(&mut grpc, "hello", None).await.unwrap(), format!("hello from {name}"));
        // A non-OK status from the service reaches the client as it was sent.
        let e = unary(&mut grpc, "missing", None).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::NotFound, "no such echo"), "{host}");

        // Both ways at once: each answer comes before the next message is sent.
        grpc.ready().await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let path = PathAndQuery::from_static("/test.Echo/Chat");
        let resp = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, ProstCodec::<Msg, Msg>::default())
            .await
            .unwrap();
        let mut inbound = resp.into_inner();
        for word in ["one", "two", "three"] {
            tx.send(Msg { text: word.to_owned() }).await.unwrap();
            let m = inbound.message().await.unwrap().unwrap();
            assert_eq!(m.text, format!("re: {word}"), "{host}");
        }
        // The status after the messages travels in the trailers, with their metadata.
        tx.send(Msg { text: "end".to_owned() }).await.unwrap();
        let end = inbound.message().await.unwrap_err();
        assert_eq!((end.code(), end.message()), (Code::Aborted, "the end"), "{host}");
        assert_eq!(end.metadata().get("x-reason").unwrap(), "asked to end", "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_refusals_are_grpc_statuses() {
    let (h2c, _a) = serve("h2c", None).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            grpc_api(
                "secure",
                "secure.test",
                &format!("http://{h2c}"),
                "  auth: {type: authToken, authToken: {header: X-Api-Key}}\n",
            ),
            grpc_api("down", "down.test", "http://127.0.0.1:1", ""),
            key("app", "app-token", "accessRights: [secure]"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let mut grpc = client(&gw, "secure.test").await;
    let e = unary(&mut grpc, "hello", None).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::Unauthenticated, "authorization field missing"));
    let e = unary(&mut grpc, "hello", Some("wrong")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(unary(&mut grpc, "hello", Some("app-token")).await.unwrap(), "hello from h2c");

    let mut down = client(&gw, "down.test").await;
    let e = unary(&mut down, "hello", None).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::Unavailable, "upstream unreachable"));
    let mut nowhere = client(&gw, "nowhere.test").await;
    assert_eq!(unary(&mut nowhere, "hello", None).await.unwrap_err().code(), Code::Unimplemented);

    // Metrics count what the gateway decided, not the 200 a gRPC refusal travels in.
    assert_eq!(gw.metric("gatehouse_requests_total{api=\"default/secure\",code=\"4xx\"}").await, 2.0);
    assert_eq!(gw.metric("gatehouse_rejections_total{api=\"default/secure\",reason=\"auth_missing\"}").await, 1.0);
}

//! Tonic's default stubs answer an unserved RPC with "Not yet implemented"; this wrapper puts
//! the RPC's name in the answer instead, so a Milvus user sees which call Walden lacks.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::server::NamedService;

/// Wraps a gRPC service so that an `UNIMPLEMENTED` answer names the RPC (tonic's default stubs
/// say only "Not yet implemented").
#[derive(Clone, Debug)]
pub struct NameUnimplemented<S>(pub S);

impl<S: NamedService> NamedService for NameUnimplemented<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for NameUnimplemented<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let unimplemented = resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"12");
            if unimplemented {
                // grpc-message is percent-encoded; the text is plain ASCII but for spaces.
                let message =
                    format!("{rpc} is not implemented by Walden's Milvus API").replace(' ', "%20");
                if let Ok(v) = http::HeaderValue::from_str(&message) {
                    resp.headers_mut().insert("grpc-message", v);
                }
            }
            Ok(resp)
        })
    }
}

//! Hooks that read and replace bodies: the gateway buffers a body only for hooks that ask.
use gatehouse_plugin::{Flow, Request, Response, declare_plugin, hook};

declare_plugin!(hooks: [UppercaseBody, WrapBody]);
hook!(request(body) UppercaseBody = uppercase_body);
hook!(response(body) WrapBody = wrap_body);

/// Sends the request body upstream in upper case.
fn uppercase_body(req: &mut Request) -> Flow {
    let upper = req.body().unwrap_or_default().to_ascii_uppercase();
    req.set_body(upper);
    Flow::Continue
}

/// Wraps the upstream's body: `wrapped(<body>)`.
fn wrap_body(resp: &mut Response) -> Flow {
    let mut out = b"wrapped(".to_vec();
    out.extend_from_slice(resp.body().unwrap_or_default());
    out.push(b')');
    resp.set_body(out);
    Flow::Continue
}

//! Tyk's logging example: adds `Foo: Bar` to the request and logs through the gateway.
use gatehouse_plugin::{Flow, Request, declare_plugin, hook, info};

declare_plugin!(hooks: [AddFooBarHeader]);
hook!(request AddFooBarHeader = add_foo_bar_header);

/// Adds a custom "Foo: Bar" header to the request.
fn add_foo_bar_header(req: &mut Request) -> Flow {
    info!("Processing HTTP request in Rust plugin!!");
    req.add_header("Foo", "Bar");
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use gatehouse_plugin::testing::TestCall;

    use super::*;

    #[test]
    fn adds_the_header_and_logs() {
        let mut call = TestCall::new("GET", "/");
        assert_eq!(call.request(add_foo_bar_header), Flow::Continue);
        assert_eq!(call.request_header("foo"), Some("Bar"));
        assert_eq!(call.logs, ["Processing HTTP request in Rust plugin!!"]);
    }
}

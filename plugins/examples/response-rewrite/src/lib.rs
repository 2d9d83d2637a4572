//! Tyk's response plugin example: adds a header to the upstream's response and replaces
//! its body.
use gatehouse_plugin::{Flow, Response, declare_plugin, hook};

declare_plugin!(hooks: [MyPluginResponse]);
hook!(response MyPluginResponse = my_plugin_response);

fn my_plugin_response(resp: &mut Response) -> Flow {
    resp.add_header("X-Response-Added", "resp-added");
    resp.set_body(r#"{"message":"Hi! I'm a response plugin"}"#);
    Flow::Continue
}

//! Tyk's "accessing the API definition" example: reads the API's name.
use gatehouse_plugin::{Flow, Request, declare_plugin, hook, info};

declare_plugin!(hooks: [MyPluginFunction]);
hook!(request MyPluginFunction = my_plugin_function);

fn my_plugin_function(req: &mut Request) -> Flow {
    info!("API name is {}", req.api().name());
    // The API definition is borrowed for the whole call, so no copy is needed.
    req.set_header("X-Api-Name", req.api().name());
    Flow::Continue
}

//! Tyk's "accessing the API definition" example: reads the API's name.
use gatehouse_plugin::{Flow, Request, declare_plugin, hook, info};

declare_plugin!();
hook!(request MyPluginFunction = my_plugin_function);

fn my_plugin_function(req: &mut Request) -> Flow {
    let name = req.api().name().to_owned();
    info!("API name is {name}");
    req.set_header("X-Api-Name", &name);
    Flow::Continue
}

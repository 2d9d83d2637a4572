//! Tyk's "accessing the session object" example: reads the key's metadata.
use gatehouse_plugin::{Flow, Request, declare_plugin, hook, info};

declare_plugin!(hooks: [MyPluginFunction]);
hook!(request MyPluginFunction = my_plugin_function);

fn my_plugin_function(req: &mut Request) -> Flow {
    let Some(session) = req.session() else { return Flow::Continue };
    let id = session.meta("tyk_developer_id").unwrap_or_default().to_owned();
    let email = session.meta("tyk_developer_email").unwrap_or_default().to_owned();
    info!("Developer ID: {id}");
    info!("Developer Email: {email}");
    req.set_header("X-Developer-Id", &id);
    req.set_header("X-Developer-Email", &email);
    Flow::Continue
}

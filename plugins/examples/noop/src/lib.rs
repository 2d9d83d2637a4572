//! Hooks that do (almost) nothing, to measure what a hook call costs.
use gatehouse_plugin::{Flow, Request, declare_plugin, hook};

declare_plugin!(hooks: [Noop, ReadTenSetOne]);
hook!(request Noop = noop);
hook!(request ReadTenSetOne = read_ten_set_one);

fn noop(_: &mut Request) -> Flow {
    Flow::Continue
}

const NAMES: [&str; 10] = ["h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9"];

/// Reads ten request headers and sets one.
fn read_ten_set_one(req: &mut Request) -> Flow {
    let total: usize = NAMES.iter().filter_map(|n| req.header(n)).map(str::len).sum();
    req.set_header("x-total", if total > 0 { "some" } else { "none" });
    Flow::Continue
}

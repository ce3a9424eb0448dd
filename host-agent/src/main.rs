//! The agent lands in issue 3; this placeholder keeps the workspace whole.

fn main() {
    eprintln!("acme-agent: not implemented yet");
    std::process::exit(64);
}

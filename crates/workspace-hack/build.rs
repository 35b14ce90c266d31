// Empty: it exists so that Cargo resolves this package's build-dependencies (see Cargo.toml).
fn main() {}

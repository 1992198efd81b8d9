//! {{name}}: an edgefn function in Rust (a core WebAssembly module, ABI v1).
//!
//! Each MQTT message on the function's triggers arrives in `handle`. What it
//! emits goes upstream once the invocation succeeds; returning an error
//! fails the invocation (retried, then a dead letter with the error's text).

use edgefn_sdk::json::{self, Value};
use edgefn_sdk::{emit, env, info, Error, Message};

edgefn_sdk::handler!(handle);

fn handle(msg: &Message) -> Result<(), Error> {
    let mut reading = match json::from_slice(msg.payload()) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => return Err("expected a JSON object".into()),
        Err(e) => return Err(format!("not JSON: {}", e).into()),
    };
    reading.insert("device", msg.topic_level(1).unwrap_or(msg.topic()));
    let record = Value::Object(reading).to_string();
    if env("VERBOSE").as_deref() == Some("1") {
        info(&format!("{}: {}", msg.topic(), record));
    }
    emit(&format!("processed/{}", msg.topic()), record)?;
    Ok(())
}

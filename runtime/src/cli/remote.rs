//! The CLI's side of the HTTP API: `status`, `query` and `dead-letters`
//! with `--url` talk to a running host instead of reading files.

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// A running host's API at a base URL such as `http://127.0.0.1:7070`.
pub struct Remote {
    base: String,
    agent: ureq::Agent,
    /// `Bearer <token>`, sent with every request when the host wants one.
    authorization: Option<String>,
}

impl Remote {
    /// A client for the host at `base`, sending the API `token` if given.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Remote {
            base: base.trim_end_matches('/').to_string(),
            agent,
            authorization: token.map(|t| format!("Bearer {t}")),
        }
    }

    /// `GET path`, as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.call().with_context(|| format!("cannot reach {url}"))?;
        answer(&url, response)
    }

    /// `POST path` with a JSON body, as JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.post_bytes(path, &serde_json::to_vec(body)?)
    }

    /// `POST path` with raw bytes labelled JSON, as JSON.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.post(&url).header("content-type", "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send(body).with_context(|| format!("cannot reach {url}"))?;
        answer(&url, response)
    }
}

fn answer(url: &str, mut response: ureq::http::Response<ureq::Body>) -> Result<Value> {
    let status = response.status();
    let text =
        response.body_mut().read_to_string().with_context(|| format!("cannot read the answer of {url}"))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let message =
            value.get("error").and_then(Value::as_str).map(String::from).unwrap_or_else(|| value.to_string());
        bail!("{url} answered {status}: {message}");
    }
    Ok(value)
}

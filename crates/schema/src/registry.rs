//! A client of the Confluent Schema Registry REST API (Apicurio's `ccompat`
//! API and Confluent's own both speak it). Every call has a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// What the registry answered instead of success.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The schema breaks the subject's compatibility rule.
    #[error(
        "schema for subject `{subject}` is not compatible with its earlier versions: {message}"
    )]
    Incompatible {
        /// The subject.
        subject: String,
        /// The registry's explanation.
        message: String,
    },
    /// No schema with this id.
    #[error("schema id {0} is not in the registry")]
    UnknownId(u32),
    /// The registry refused the schema itself.
    #[error("the registry rejected the schema for `{subject}`: {message}")]
    Invalid {
        /// The subject.
        subject: String,
        /// The registry's explanation.
        message: String,
    },
    /// Any other non-success answer.
    #[error("registry answered {status} to {what}: {body}")]
    Http {
        /// The call made.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The answer's body.
        body: String,
    },
    /// The registry could not be reached or did not answer in time.
    #[error("registry unavailable ({what}): {reason}")]
    Unavailable {
        /// The call made.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// A client of a Confluent-compatible Schema Registry API (Apicurio's
/// `/apis/ccompat/v7` here).
#[derive(Debug)]
pub struct RegistryClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    requests: AtomicU64,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl RegistryClient {
    /// `base` is the API root, e.g. `http://host:8081` (Confluent) or
    /// `http://host:8080/apis/ccompat/v7` (Apicurio).
    pub fn new(base: &str, timeout: Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
            requests: AtomicU64::new(0),
        }
    }

    /// Requests sent so far (the codec's cache is measured by it).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), RegistryError> {
        let what = format!("{method} {path}");
        let unavailable = |reason: String| RegistryError::Unavailable {
            what: what.clone(),
            reason,
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let request = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(hyper::header::ACCEPT, CONTENT_TYPE)
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| unavailable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            Ok::<_, RegistryError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unavailable(format!("no answer in {:?}", self.timeout)))??;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }

    fn message(body: &Value) -> String {
        body.get("message")
            .and_then(Value::as_str)
            .map_or_else(|| body.to_string(), str::to_owned)
    }

    /// Sets the subject's compatibility level (e.g. `BACKWARD`).
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        let path = format!("/config/{subject}");
        let (status, body) = self
            .call(
                hyper::Method::PUT,
                &path,
                Some(json!({ "compatibility": level })),
            )
            .await?;
        match status {
            200..=299 => Ok(()),
            _ => Err(RegistryError::Http {
                what: format!("PUT {path}"),
                status,
                body: body.to_string(),
            }),
        }
    }

    /// The subject's compatibility rule, if it has its own.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<String>, RegistryError> {
        let path = format!("/config/{subject}");
        let (status, body) = self.call(hyper::Method::GET, &path, None).await?;
        match status {
            200 => Ok(body
                .get("compatibilityLevel")
                .or_else(|| body.get("compatibility"))
                .and_then(Value::as_str)
                .map(str::to_owned)),
            404 => Ok(None),
            _ => Err(RegistryError::Http {
                what: format!("GET {path}"),
                status,
                body: body.to_string(),
            }),
        }
    }

    /// Registers `schema` (Avro JSON) under `subject`; the id of the same
    /// schema if it is already there. Refused if incompatible.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let path = format!("/subjects/{subject}/versions");
        let (status, body) = self
            .call(
                hyper::Method::POST,
                &path,
                Some(json!({ "schema": schema, "schemaType": "AVRO" })),
            )
            .await?;
        match status {
            200..=299 => body
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| RegistryError::Http {
                    what: format!("POST {path}"),
                    status,
                    body: body.to_string(),
                }),
            409 => Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                message: Self::message(&body),
            }),
            422 => Err(RegistryError::Invalid {
                subject: subject.to_owned(),
                message: Self::message(&body),
            }),
            _ => Err(RegistryError::Http {
                what: format!("POST {path}"),
                status,
                body: body.to_string(),
            }),
        }
    }

    /// The schema (Avro JSON) with this id.
    pub async fn schema(&self, id: u32) -> Result<String, RegistryError> {
        let path = format!("/schemas/ids/{id}");
        let (status, body) = self.call(hyper::Method::GET, &path, None).await?;
        match status {
            200 => body
                .get("schema")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| RegistryError::Http {
                    what: format!("GET {path}"),
                    status,
                    body: body.to_string(),
                }),
            404 => Err(RegistryError::UnknownId(id)),
            _ => Err(RegistryError::Http {
                what: format!("GET {path}"),
                status,
                body: body.to_string(),
            }),
        }
    }
}

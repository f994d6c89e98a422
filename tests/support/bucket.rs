//! A real S3 server on loopback for the bucket store's tests: `s3s-fs` (objects as files
//! under a temporary directory) served by s3s and hyper, checking SigV4 signatures with the
//! tests' keys. It records each request's method, path and server-side encryption header,
//! and can be told to refuse writes or to fail everything.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use braze_export_operator::bucket::{Bucket, BucketSettings};
use braze_export_operator::redacted::Redacted;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::service::S3Service;

/// The bucket every test uses.
pub const BUCKET: &str = "audiences";
/// The tests' access key id (an identifier, yet never to be shown either).
pub const ACCESS_KEY: &str = "AKIABUCKETTEST7Q2X";
/// The tests' secret key.
pub const SECRET_KEY: &str = "bucket-secret-V9s3-do-not-leak";

/// What the server is told to do wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// PUT and POST answer 403 AccessDenied (a policy refusing writes).
    RefuseWrites,
    /// Everything answers 503 SlowDown.
    Unavailable,
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub sse: Option<String>,
}

/// A running S3 server.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    root: tempfile::TempDir,
    seen: Arc<Mutex<Vec<Seen>>>,
    fault: Arc<Mutex<Option<Fault>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Recording {
    s3: S3Service,
    seen: Arc<Mutex<Vec<Seen>>>,
    fault: Arc<Mutex<Option<Fault>>>,
}

type Response = hyper::Response<s3s::Body>;

impl hyper::service::Service<hyper::Request<Incoming>> for Recording {
    type Response = Response;
    type Error = s3s::HttpError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, s3s::HttpError>> + Send>,
    >;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let method = req.method().to_string();
        self.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: req.uri().path().to_owned(),
            sse: req
                .headers()
                .get("x-amz-server-side-encryption")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        let fault = *self.fault.lock().unwrap();
        let refuse = |status: u16, code: &str| {
            // Like S3's: the body echoes the access key id, which must never be shown.
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>refused</Message><AWSAccessKeyId>{ACCESS_KEY}</AWSAccessKeyId></Error>"
            );
            let r = hyper::Response::builder()
                .status(status)
                .header("content-type", "application/xml")
                .body(s3s::Body::from(body))
                .unwrap();
            Box::pin(async move { Ok(r) }) as Self::Future
        };
        match fault {
            Some(Fault::Unavailable) => return refuse(503, "SlowDown"),
            Some(Fault::RefuseWrites) if method == "PUT" || method == "POST" => {
                return refuse(403, "AccessDenied");
            }
            _ => {}
        }
        hyper::service::Service::call(&self.s3, req)
    }
}

impl S3Server {
    /// Starts a server with the bucket [`BUCKET`], empty.
    pub async fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = Recording {
            s3: b.build(),
            seen: Arc::default(),
            fault: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (seen, fault) = (Arc::clone(&service.seen), Arc::clone(&service.fault));
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Self {
            endpoint,
            root,
            seen,
            fault,
            task,
        }
    }

    /// How to reach it with the tests' keys.
    pub fn settings(&self) -> BucketSettings {
        BucketSettings {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            keys: Some((ACCESS_KEY.into(), Redacted::new(SECRET_KEY))),
            ..BucketSettings::default()
        }
    }

    /// The bucket at `prefix` (`s3://audiences/<prefix>`).
    pub fn bucket(&self, prefix: &str) -> Bucket {
        Bucket::open(
            &format!("s3://{BUCKET}/{prefix}"),
            "the test",
            &self.settings(),
        )
        .unwrap()
    }

    /// The environment `run --state s3://...` reads.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }

    /// The size of object `key`, in bytes (0 when there is none).
    pub fn size(&self, key: &str) -> u64 {
        std::fs::metadata(self.root.path().join(BUCKET).join(key)).map_or(0, |m| m.len())
    }

    /// Every object key in the bucket, sorted.
    pub fn objects(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path: PathBuf = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if path.is_dir() {
                    walk(&path, base, out);
                } else {
                    out.push(
                        path.strip_prefix(base)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        let base = self.root.path().join(BUCKET);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    /// The bytes of object `key`.
    pub fn object(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.root.path().join(BUCKET).join(key)).unwrap()
    }

    /// Replaces the bytes of object `key` behind the server's back (a damaged object).
    pub fn damage(&self, key: &str, bytes: &[u8]) {
        std::fs::write(self.root.path().join(BUCKET).join(key), bytes).unwrap();
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Sets (or clears) the fault.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.fault.lock().unwrap() = fault;
    }
}

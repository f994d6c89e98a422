//! The fake Kubernetes API server (the `fake-apiserver` dev crate, `tests/fake-apiserver/`) as
//! these tests start it: admitting BrazeExports by this crate's own `BrazeExport::crd()`.

use braze_export_operator::spec::BrazeExport;
use fake_apiserver::FakeApiServer;
use kube::CustomResourceExt;

/// `FakeApiServer::start()` (bring it in scope with `use fake::Start as _;`).
pub trait Start {
    /// Starts an empty server admitting BrazeExports by `BrazeExport::crd()`.
    fn start() -> impl Future<Output = FakeApiServer> + Send;
}

impl Start for FakeApiServer {
    fn start() -> impl Future<Output = FakeApiServer> + Send {
        FakeApiServer::start_with_crd(serde_json::to_value(BrazeExport::crd()).expect("crd"))
    }
}

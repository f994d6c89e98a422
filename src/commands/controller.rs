//! `braze-export-operator controller`: run the operator in a cluster or against the current
//! kubeconfig.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bucket::{Bucket, BucketSettings};
use crate::controller::audiences::AudienceStore;
use crate::controller::{self, CONTROLLER_NAME, Config, LeaderElection, StoreSlot};
use crate::looker::hosts::AllowedHosts;
use crate::ops::metrics::Metrics;
use crate::ops::server::{self, Health};

/// Arguments of `controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Watch only these namespaces, comma-separated or repeated (default: all namespaces).
    /// With a list, the operator needs a Role in each namespace instead of a ClusterRole.
    #[arg(long, value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// Handle only exports matching this label selector (for sharding), e.g. `team=crm`.
    #[arg(long)]
    pub selector: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Runs in progress at once, across all exports.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_runs: u16,
    /// Lease-based leader election: only the Lease holder runs exports, every replica is
    /// Ready. The chart always turns it on, so a rolling update never runs an export twice.
    #[arg(long)]
    pub leader_election: bool,
    /// Name of the Lease (default: braze-export-operator); one per release, so shards with
    /// different selectors never share one.
    #[arg(long, default_value = CONTROLLER_NAME)]
    pub lease_name: String,
    /// Seconds the Lease stays valid without renewal; the holder stops its runs a fifth of
    /// it before then.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub lease_duration_seconds: u64,
    /// Looker hosts exports may call, comma-separated: exact host names or `*.domain`
    /// patterns, e.g. `*.looker.com,*.cloud.looker.com` (default: any host).
    #[arg(long)]
    pub looker_allowed_hosts: Option<String>,
    /// Namespace of the Lease (default: POD_NAMESPACE, else the client's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's name (default: POD_NAME, else the host name); the operator instance is
    /// this name and a per-process suffix.
    #[arg(long = "identity", env = "POD_NAME", value_name = "IDENTITY")]
    pub pod_name: Option<String>,
    /// Where exports keep their stored audience (`removal: Remove`, `delta: true`): `secrets`
    /// (Secrets beside each export, for small audiences) or `s3://BUCKET/PREFIX` (an
    /// S3-compatible bucket, objects under PREFIX/<export uid>/). The bucket's credentials
    /// come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the pod's
    /// workload identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, EKS Pod Identity,
    /// instance metadata).
    #[arg(
        long,
        default_value = "secrets",
        value_name = "secrets|s3://BUCKET/PREFIX"
    )]
    pub audience_store: String,
    /// With `--audience-store secrets`: the most an export's encoded audience may take in
    /// Secrets, in MiB; a larger one is not saved (the run ends PartiallySucceeded with
    /// AudienceNotSaved, the previous audience kept).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub audience_secrets_budget_mib: u32,
    /// The bucket's S3 endpoint, for MinIO, Ceph or GCS (`https://storage.googleapis.com`);
    /// default: AWS_ENDPOINT_URL, else AWS S3. `https` (plain `http` only on loopback).
    #[arg(long, value_name = "URL")]
    pub audience_store_endpoint: Option<String>,
    /// The bucket's region (default: AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub audience_store_region: Option<String>,
    /// Server-side encryption asked of every object written: AES256, aws:kms or
    /// aws:kms:dsse (default: the bucket's own).
    #[arg(long, value_name = "MODE")]
    pub audience_store_sse: Option<String>,
    /// The KMS key of `--audience-store-sse aws:kms` (default: the bucket's default key).
    #[arg(long, value_name = "KEY_ID")]
    pub audience_store_sse_kms_key_id: Option<String>,
    /// Where runs sort what does not fit in memory (the users of large Looks and audiences;
    /// default: the system's temporary directory). The chart mounts an `emptyDir` here.
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<std::path::PathBuf>,
}

impl ControllerArgs {
    /// Where audiences are kept, as the flags say.
    pub fn audience_store(&self) -> Result<AudienceStore, String> {
        let store = self.audience_store.trim();
        if store.eq_ignore_ascii_case("secrets") {
            return Ok(AudienceStore::Secrets {
                budget: (self.audience_secrets_budget_mib as usize) << 20,
            });
        }
        if !store.starts_with(crate::bucket::SCHEME) {
            return Err(format!(
                "--audience-store: {store:?} is neither `secrets` nor an s3://BUCKET/PREFIX URL"
            ));
        }
        let settings = BucketSettings {
            endpoint: self.audience_store_endpoint.clone(),
            region: self.audience_store_region.clone(),
            encryption: self.audience_store_sse.clone(),
            kms_key_id: self.audience_store_sse_kms_key_id.clone(),
            keys: None,
            from_env: true,
        };
        Bucket::open(store, "--audience-store", &settings)
            .map(AudienceStore::Bucket)
            .map_err(|e| e.to_string())
    }
}

/// Runs the controller until SIGTERM or Ctrl-C; returns the exit code.
pub async fn controller(args: ControllerArgs) -> i32 {
    crate::http::install_crypto_provider();
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot connect to Kubernetes (in-cluster config or kubeconfig): {e}");
            return 2;
        }
    };
    let audience_store = match args.audience_store() {
        Ok(store) => {
            match &store {
                AudienceStore::Secrets { budget } => tracing::info!(
                    budget_mib = budget >> 20,
                    "stored audiences are kept in Secrets beside their export"
                ),
                AudienceStore::Bucket(b) => tracing::info!(
                    bucket = %b.name(),
                    "stored audiences are kept in an S3-compatible bucket"
                ),
            }
            store
        }
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let allowed_hosts = match args.looker_allowed_hosts.as_deref() {
        None => AllowedHosts::any(),
        Some(list) => match AllowedHosts::parse(list) {
            Ok(hosts) => hosts,
            Err(e) => {
                eprintln!("error: --looker-allowed-hosts: {e}");
                return 2;
            }
        },
    };
    // The pod name, and a suffix for this process: a restarted container keeps its pod name
    // but is another runner.
    let pod = args.pod_name.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME").unwrap_or_else(|_| CONTROLLER_NAME.to_owned())
    });
    let instance = format!("{pod}_{:08x}", fastrand::u32(..));
    let leader_election = args.leader_election.then(|| LeaderElection {
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned()),
        lease_name: args.lease_name.clone(),
        duration: Duration::from_secs(args.lease_duration_seconds),
    });
    let config = Config {
        namespaces: namespaces(&args.namespace),
        selector: args.selector.clone(),
        max_concurrent_runs: usize::from(args.max_concurrent_runs),
        leader_election,
        instance,
        allowed_hosts,
        audience_store,
        scratch: crate::spill::Scratch::new(args.scratch_dir.clone()),
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let store: StoreSlot = Arc::default();
    let health = Health {
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
        before_scrape: {
            let (store, metrics) = (Arc::clone(&store), Arc::clone(&metrics));
            Arc::new(move || {
                controller::refresh_gauges(
                    &metrics,
                    &controller::cached(&store),
                    jiff::Timestamp::now(),
                );
            })
        },
    };
    match server::serve(args.metrics_addr, health, shutdown.clone()).await {
        Ok(addr) => tracing::info!(%addr, "serving /metrics, /healthz and /readyz"),
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.metrics_addr);
            return 2;
        }
    }
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match controller::serve(client, config, metrics, ready, store, shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "the controller stopped");
            1
        }
    }
}

/// The namespaces to watch: trimmed, without empty entries or repeats (two watches of one
/// namespace would reconcile each export twice).
fn namespaces(args: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in args.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_owned());
        }
    }
    out
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down: stopping runs and recording them as Interrupted");
    shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(30)).await;
    tracing::warn!("shutdown took too long; exiting");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    fn store(args: &[&str]) -> Result<AudienceStore, String> {
        let mut all = vec!["controller"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().args.audience_store()
    }

    #[test]
    fn the_audience_store_is_secrets_by_default_or_a_bucket_url() {
        assert!(matches!(
            store(&[]),
            Ok(AudienceStore::Secrets { budget }) if budget == 8 << 20
        ));
        assert!(matches!(
            store(&["--audience-secrets-budget-mib", "2"]),
            Ok(AudienceStore::Secrets { budget }) if budget == 2 << 20
        ));
        let Ok(AudienceStore::Bucket(b)) = store(&[
            "--audience-store=s3://acme-audiences/prod",
            "--audience-store-endpoint=https://minio.storage:9000",
            "--audience-store-sse=AES256",
        ]) else {
            panic!("a bucket");
        };
        assert_eq!(b.name(), "acme-audiences");
        for (args, message) in [
            (
                vec!["--audience-store=/var/audiences"],
                "--audience-store: \"/var/audiences\" is neither `secrets` nor an s3://BUCKET/PREFIX URL",
            ),
            (
                vec![
                    "--audience-store=s3://a/p",
                    "--audience-store-endpoint=http://minio:9000",
                ],
                "--audience-store-endpoint: \"http://minio:9000\" must use https (plain http only on loopback): stored audiences hold personal data",
            ),
            (
                vec!["--audience-store=s3://a/p", "--audience-store-sse=aes"],
                "--audience-store-sse: \"aes\" is not one of AES256, aws:kms, aws:kms:dsse",
            ),
        ] {
            assert_eq!(store(&args).unwrap_err(), message);
        }
    }

    #[test]
    fn namespaces_are_trimmed_and_unique() {
        let args: Vec<String> = ["crm", " marketing", "", "crm", "sales "]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(super::namespaces(&args), ["crm", "marketing", "sales"]);
    }
}

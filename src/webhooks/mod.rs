//! Webhooks: backends hear about changes, signed, at least once.
//!
//! A change is recorded in the transaction that stores it ([`outbox`]).
//! Every replica runs [`run`]: it turns changes quiet for 2 s (or first made
//! 10 s ago) into `document.changed` events, one delivery per URL, then
//! leases due deliveries and sends them. The database is the only state, so
//! a restart or a SIGKILL loses nothing, and the lease makes one replica send
//! each attempt; a crashed replica's leases run out and another takes over.
//! A failed attempt (non-2xx, timeout, refused) is retried with exponential
//! backoff and jitter, each URL on its own, for up to [`GIVE_UP_AFTER`].

pub mod outbox;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::config::WebhookArgs;
use crate::metrics as m;
use crate::store::Store;
use outbox::{now_ms, Delivery, Outbox};

/// A document's changes become one event this long after the last of them…
const QUIET: Duration = Duration::from_secs(2);
/// …or this long after the first, if they keep coming.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// How often each replica looks for due changes and deliveries.
const POLL: Duration = Duration::from_millis(250);
/// Deliveries one replica leases at a time.
const BATCH: i64 = 32;
/// The first retry waits about this long; each next one twice as long…
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// …up to this.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// An event still undelivered this long after it was made is dropped, with
/// an error in the log and the `dropped` outcome.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(72 * 3600);

/// Validated webhook settings.
#[derive(Clone)]
pub struct Webhooks {
    urls: Vec<String>,
    secret: String,
    timeout: Duration,
}

impl Webhooks {
    /// `None` without URLs; an error for a URL that does not parse or a URL
    /// without a secret.
    pub fn from_args(args: &WebhookArgs) -> anyhow::Result<Option<Self>> {
        let urls: Vec<String> = args
            .webhook_urls
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        for url in &urls {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| anyhow::anyhow!("invalid --webhook-url {}: {e}", redact(url)))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                anyhow::bail!(
                    "invalid --webhook-url {}: only http:// and https:// URLs with a host",
                    redact(url)
                );
            }
        }
        let secret = args
            .webhook_secret
            .clone()
            .filter(|s| !s.is_empty())
            .context("--webhook-url is set but --webhook-secret (CONCORD_WEBHOOK_SECRET) is not: every webhook is signed")?;
        Ok(Some(Self {
            urls,
            secret,
            timeout: args.webhook_timeout,
        }))
    }

    /// Queues `document.restored` for every URL; the sender delivers it like
    /// any event (durably, at least once, by one replica).
    pub async fn announce_restore(
        &self,
        store: &dyn Store,
        doc: &str,
        authors: Vec<String>,
        version: &str,
    ) -> Result<(), crate::store::StoreError> {
        let Some(outbox) = store.outbox() else {
            return Ok(());
        };
        let (id, body) = event("document.restored", doc, authors, Some(version));
        outbox.enqueue(&id, &body, &self.urls, now_ms()).await
    }

    /// A lease outlasts an attempt, so a live replica is never overtaken.
    fn lease(&self) -> Duration {
        self.timeout * 3
    }
}

/// Starts delivering; the task ends, giving back its leases, on `shutdown`.
pub fn spawn(
    store: Arc<dyn Store>,
    webhooks: Webhooks,
    replica: Arc<str>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    store
        .outbox()
        .context("this store keeps no webhook outbox")?
        .track_changes();
    let client = reqwest::Client::builder()
        .timeout(webhooks.timeout)
        .connect_timeout(webhooks.timeout)
        .user_agent(concat!("concord/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the webhook HTTP client")?;
    let sender = Sender {
        store,
        webhooks,
        replica,
        client,
    };
    Ok(tokio::spawn(sender.run(shutdown)))
}

struct Sender {
    store: Arc<dyn Store>,
    webhooks: Webhooks,
    replica: Arc<str>,
    client: reqwest::Client,
}

impl Sender {
    fn outbox(&self) -> &dyn Outbox {
        self.store.outbox().expect("checked at spawn")
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let round = self.round();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                result = round => if let Err(error) = result {
                    tracing::warn!(%error, "webhook outbox unavailable; retrying");
                },
            }
        }
        if let Err(error) = self.outbox().release(&self.replica).await {
            tracing::warn!(%error, "cannot give back webhook leases; they expire on their own");
        }
    }

    /// Due changes become events; due deliveries are attempted, at once.
    async fn round(&self) -> Result<(), crate::store::StoreError> {
        let now = now_ms();
        let outbox = self.outbox();
        outbox
            .promote(
                now,
                now - QUIET.as_millis() as i64,
                now - MAX_WAIT.as_millis() as i64,
                &self.webhooks.urls,
                &changed_event,
            )
            .await?;
        let lease_until = now + self.webhooks.lease().as_millis() as i64;
        let due = outbox.claim(now, lease_until, &self.replica, BATCH).await?;
        let attempts = due.into_iter().map(|d| self.attempt(d));
        for result in futures::future::join_all(attempts).await {
            result?;
        }
        let (pending, oldest) = outbox.backlog().await?;
        metrics::gauge!(m::WEBHOOK_EVENTS_PENDING).set(pending as f64);
        let age = oldest.map_or(0.0, |at| (now_ms() - at).max(0) as f64 / 1000.0);
        metrics::gauge!(m::WEBHOOK_OLDEST_PENDING_SECONDS).set(age);
        Ok(())
    }

    async fn attempt(&self, d: Delivery) -> Result<(), crate::store::StoreError> {
        let failure = match self
            .client
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                "X-Concord-Signature",
                signature(&self.webhooks.secret, &d.body),
            )
            .header("X-Concord-Delivery", &d.id)
            .body(d.body.clone())
            .send()
            .await
        {
            Ok(answer) if answer.status().is_success() => None,
            Ok(answer) => Some(format!("answered {}", answer.status())),
            // The error's text would carry the whole URL.
            Err(error) => Some(error.without_url().to_string()),
        };
        let outbox = self.outbox();
        let Some(why) = failure else {
            metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "delivered").increment(1);
            return outbox.finish(d.seq).await;
        };
        let attempts = d.attempts + 1;
        let now = now_ms();
        if now - d.created_at >= GIVE_UP_AFTER.as_millis() as i64 {
            metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "dropped").increment(1);
            tracing::error!(
                url = %redact(&d.url), delivery = %d.id, attempts, reason = %why,
                "webhook delivery given up"
            );
            return outbox.finish(d.seq).await;
        }
        let wait = backoff(attempts);
        metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "failed").increment(1);
        tracing::warn!(
            url = %redact(&d.url), delivery = %d.id, attempt = attempts, reason = %why,
            retry_in = ?wait, "webhook delivery failed"
        );
        outbox.retry(d.seq, now + wait.as_millis() as i64).await
    }
}

/// A `document.changed` event: its id and its body.
fn changed_event(doc: &str, authors: Vec<String>) -> (String, String) {
    event("document.changed", doc, authors, None)
}

fn event(kind: &str, doc: &str, authors: Vec<String>, version: Option<&str>) -> (String, String) {
    let id = format!("{:032x}", rand::random::<u128>());
    let body = serde_json::json!({
        "event": kind,
        "doc": doc,
        "at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "authors": authors,
        "version": version,
    });
    (id, body.to_string())
}

/// `sha256=<hex HMAC-SHA256 of the body>`.
fn signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The wait before attempt `failed + 1`: doubling from [`FIRST_RETRY`] up to
/// [`MAX_RETRY`], each a random point in its upper half, so receivers that
/// come back are not hit by every replica's retries at once.
fn backoff(failed: i32) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1u32 << (failed.clamp(1, 13) - 1) as u32);
    let ceiling = doubled.min(MAX_RETRY);
    ceiling.mul_f64(rand::random_range(0.5..=1.0))
}

/// A URL for the logs: no credentials, no query (either may hold a secret).
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hex_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", "what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_within_its_jitter_and_stops_growing() {
        for failed in 1..=20 {
            let ceiling = FIRST_RETRY
                .saturating_mul(1 << (failed.min(13) - 1))
                .min(MAX_RETRY);
            let wait = backoff(failed);
            assert!(wait >= ceiling / 2 && wait <= ceiling, "{failed}: {wait:?}");
        }
    }

    #[test]
    fn bad_configuration_is_refused_with_a_reason() {
        let args = |urls: &[&str], secret: Option<&str>| WebhookArgs {
            webhook_urls: urls.iter().map(|u| u.to_string()).collect(),
            webhook_secret: secret.map(str::to_string),
            webhook_timeout: Duration::from_secs(10),
        };
        assert!(Webhooks::from_args(&args(&[], None)).unwrap().is_none());
        let no_secret = Webhooks::from_args(&args(&["http://h/x"], None))
            .err()
            .unwrap();
        assert!(no_secret.to_string().contains("--webhook-secret"));
        let bad = Webhooks::from_args(&args(&["not a url"], Some("s")))
            .err()
            .unwrap();
        assert!(bad.to_string().contains("invalid --webhook-url"));
        let ftp = Webhooks::from_args(&args(&["ftp://h/x"], Some("s")))
            .err()
            .unwrap();
        assert!(ftp.to_string().contains("invalid --webhook-url"));
        let ok = Webhooks::from_args(&args(&["http://h/x", "https://k/y?t=1"], Some("s")));
        assert_eq!(ok.unwrap().unwrap().urls.len(), 2);
        assert_eq!(redact("https://u:p@k/y?token=1"), "https://k/y");
    }
}

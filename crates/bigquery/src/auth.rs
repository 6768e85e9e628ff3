//! Access tokens: a tenant's service-account key (real BigQuery, or a token endpoint the
//! operator allowed), or a fixed token for the local emulator.

use crate::error::BqError;
use crate::impersonation::Impersonator;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

/// Google's token endpoint, what every genuine service-account key names as its `token_uri`.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// The operator setting that allows token endpoints other than Google's (named in refusals).
pub const ALLOW_HOSTS_VAR: &str = "TENANTSYNC_TOKEN_URI_ALLOW_HOSTS";

/// Which token endpoints a key's `token_uri` may name.
///
/// A key file comes from a customer, and onboarding POSTs a signed assertion to its `token_uri`
/// from inside the deployment's network: a key naming the cloud metadata address, a loopback
/// service or an internal host turns `tenant add` into a request forgery. So only Google's
/// endpoint is used unless the operator lists other hosts (a test or on-premises token service).
/// Hosts are compared after parsing, exactly: `[::ffff:127.0.0.1]` is not `127.0.0.1`, and a
/// name is not matched by its subdomains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUriPolicy {
    allowed: Vec<AllowedHost>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedHost {
    host: url::Host<String>,
    /// None: any port.
    port: Option<u16>,
}

impl TokenUriPolicy {
    /// Google's token endpoint only.
    pub fn google_only() -> Self {
        Self::default()
    }

    /// Also allow the hosts of a comma-separated list of `host` or `host:port` entries
    /// (`[v6]` or `[v6]:port` for IPv6). Such hosts may be reached over plain http: they are
    /// the operator's own (a token service on loopback in tests).
    pub fn allowing(list: &str) -> Result<Self, String> {
        let mut allowed = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            allowed.push(AllowedHost::parse(entry)?);
        }
        Ok(Self { allowed })
    }

    /// Check a key's `token_uri` and return it parsed and normalized: the URL the token request
    /// must go to, so that the HTTP client never sees a spelling this check did not parse.
    /// Every refusal names `token_uri`; none echoes more of the key.
    pub fn check(&self, token_uri: &str) -> Result<url::Url, BqError> {
        let refuse = |why: String| BqError::BadCredentials(format!("token_uri {why}"));
        let url = url::Url::parse(token_uri)
            .map_err(|e| refuse(format!("is not an absolute URL ({e})")))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(refuse(format!(
                "has scheme {:?}; only https is used",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse(
                "carries a user name or password; a token endpoint URL has none".into(),
            ));
        }
        let Some(host) = url.host() else {
            return Err(refuse("has no host".into()));
        };
        if url.as_str() == GOOGLE_TOKEN_URI {
            return Ok(url);
        }
        let host = host.to_owned();
        let port = url.port_or_known_default();
        if self
            .allowed
            .iter()
            .any(|a| a.host == host && (a.port.is_none() || a.port == port))
        {
            return Ok(url);
        }
        Err(refuse(format!(
            "names {}{}, not Google's token endpoint {GOOGLE_TOKEN_URI}; an operator can allow \
             other hosts with {ALLOW_HOSTS_VAR}",
            host,
            port.map(|p| format!(":{p}")).unwrap_or_default(),
        )))
    }
}

impl AllowedHost {
    fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{entry:?} is not a host or host:port ({why})");
        // Parsed the way token URIs are, so both sides normalize alike (case, IPv4 forms).
        let url = url::Url::parse(&format!("http://{entry}/")).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(bad("a bare host is expected"));
        }
        let host = url.host().ok_or_else(|| bad("no host"))?.to_owned();
        // `url` drops a port equal to the scheme's default, so read whether one was written.
        let explicit_port = entry.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        });
        Ok(Self {
            host,
            port: explicit_port.then(|| url.port_or_known_default()).flatten(),
        })
    }
}

/// How a tenant authenticates.
#[derive(Clone)]
pub enum Credentials {
    /// The emulator accepts any bearer token; this one is fixed and not secret.
    Emulator,
    /// A service-account key JSON, kept secret.
    ServiceAccount(SecretString),
    /// No key: the deployment's own account impersonates this service account (its address;
    /// see [`crate::impersonation`]).
    Impersonated(String),
}

impl Credentials {
    /// How a tenant authenticates: its opened key, else the account it impersonates, else
    /// (against the emulator only) nothing. None: it has no way to reach BigQuery.
    pub fn of_tenant(
        key: Option<SecretString>,
        impersonate: Option<&str>,
        emulator: bool,
    ) -> Option<Self> {
        match (key, impersonate) {
            (Some(key), _) => Some(Self::ServiceAccount(key)),
            (None, Some(email)) => Some(Self::Impersonated(email.to_string())),
            (None, None) => emulator.then_some(Self::Emulator),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Emulator => f.write_str("Credentials::Emulator"),
            Self::ServiceAccount(_) => f.write_str("Credentials::ServiceAccount([REDACTED])"),
            Self::Impersonated(email) => write!(f, "Credentials::Impersonated({email})"),
        }
    }
}

/// Non-secret facts of a parsed key, for display and validation messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    pub project_id: Option<String>,
    pub token_uri: String,
}

/// Parse a service-account key, naming what is wrong without echoing any of it.
pub fn parse_service_account(json: &SecretString) -> Result<ServiceAccount, BqError> {
    let bad = |why: String| BqError::BadCredentials(why);
    let v: serde_json::Value = serde_json::from_str(json.expose_secret()).map_err(|e| {
        bad(format!(
            "service-account key is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("service-account key must be a JSON object".into()))?;
    match obj.get("type").and_then(|t| t.as_str()) {
        Some("service_account") => {}
        Some(other) => {
            return Err(bad(format!(
            "key has type {other:?}; a service-account key (type \"service_account\") is required"
        )))
        }
        None => {
            return Err(bad(
                "key has no \"type\" field; is it a service-account key?".into(),
            ))
        }
    }
    let missing: Vec<&str> = ["client_email", "private_key", "token_uri"]
        .into_iter()
        .filter(|f| {
            obj.get(*f)
                .and_then(|v| v.as_str())
                .is_none_or(str::is_empty)
        })
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "service-account key is missing field(s): {}",
            missing.join(", ")
        )));
    }
    let pk = obj["private_key"].as_str().unwrap_or_default();
    if !pk.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(bad("private_key is not a PEM-encoded PKCS#8 RSA key".into()));
    }
    Ok(ServiceAccount {
        client_email: obj["client_email"].as_str().unwrap_or_default().to_string(),
        project_id: obj
            .get("project_id")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        token_uri: obj["token_uri"].as_str().unwrap_or_default().to_string(),
    })
}

#[derive(Clone)]
pub(crate) enum TokenSource {
    Fixed(&'static str),
    ServiceAccount(Arc<ServiceAccountTokens>),
    Impersonated(Arc<ImpersonatedTokens>),
}

/// One impersonated account and its current token.
pub(crate) struct ImpersonatedTokens {
    by: Arc<Impersonator>,
    email: String,
    cache: TokenCache,
}

/// Token fetches (requests to a token endpoint) per second per process, with a burst of as
/// many. A worker that starts with a thousand tenants, or one whose tenants' tokens all expire
/// together, queues its fetches instead of sending a thousand signed requests at once; a key
/// the endpoint keeps refusing is asked again at most at this pace, whatever its slices do.
const TOKEN_FETCHES_PER_SECOND: u32 = 20;

static TOKEN_FETCH_LIMIT: LazyLock<DefaultDirectRateLimiter> = LazyLock::new(|| {
    RateLimiter::direct(Quota::per_second(
        NonZeroU32::new(TOKEN_FETCHES_PER_SECOND).expect("non-zero"),
    ))
});

/// One tenant's key and its current token.
pub(crate) struct ServiceAccountTokens {
    auth: yup_oauth2::authenticator::DefaultAuthenticator,
    cache: TokenCache,
}

impl TokenSource {
    pub(crate) async fn new(
        creds: &Credentials,
        policy: &TokenUriPolicy,
        impersonator: Option<&Arc<Impersonator>>,
    ) -> Result<Self, BqError> {
        match creds {
            Credentials::Emulator => Ok(Self::Fixed("emulator-token")),
            Credentials::Impersonated(email) => {
                let by = impersonator.ok_or_else(|| {
                    BqError::BadCredentials(format!(
                        "{email} is to be impersonated, but this process has no account of its \
                         own to do it with (TENANTSYNC_IMPERSONATOR_KEY_FILE)"
                    ))
                })?;
                Ok(Self::Impersonated(Arc::new(ImpersonatedTokens {
                    by: by.clone(),
                    email: email.clone(),
                    cache: TokenCache::default(),
                })))
            }
            Credentials::ServiceAccount(json) => {
                let sa = parse_service_account(json)?;
                // Checked on every use, not only at onboarding: keys stored before the policy
                // existed, or under a wider allow-list, are held to the current one.
                let token_uri = policy.check(&sa.token_uri)?;
                let mut key =
                    yup_oauth2::parse_service_account_key(json.expose_secret().as_bytes())
                        .map_err(|_| {
                            BqError::BadCredentials(
                                "service-account key could not be parsed".into(),
                            )
                        })?;
                key.token_uri = token_uri.into();
                let auth = yup_oauth2::ServiceAccountAuthenticator::builder(key)
                    .build()
                    .await
                    .map_err(|e| {
                        BqError::BadCredentials(format!(
                            "service-account private key is unusable: {}",
                            e.kind()
                        ))
                    })?;
                Ok(Self::ServiceAccount(Arc::new(ServiceAccountTokens {
                    auth,
                    cache: TokenCache::default(),
                })))
            }
        }
    }

    pub(crate) async fn token(&self) -> Result<String, BqError> {
        match self {
            Self::Fixed(t) => Ok((*t).to_string()),
            Self::ServiceAccount(sa) => {
                let fetch = || async {
                    let tok = sa
                        .auth
                        .token(&[SCOPE])
                        .await
                        .map_err(classify_token_error)?;
                    let value = tok.token().map(str::to_string).ok_or_else(|| {
                        BqError::CredentialsRejected(
                            "token endpoint returned no access token".into(),
                        )
                    })?;
                    Ok((value, tok.expiration_time().map(SystemTime::from)))
                };
                sa.cache.get(&TOKEN_FETCH_LIMIT, fetch).await
            }
            Self::Impersonated(i) => {
                let fetch = || i.by.token_for(&i.email, SCOPE);
                i.cache.get(&TOKEN_FETCH_LIMIT, fetch).await
            }
        }
    }
}

/// A tenant's current access token, fetched again a minute before it expires.
///
/// Every slice of a tenant asks for its token before each request. The cache answers them
/// without a fetch while the token is good; when it is not, one caller fetches (through the
/// process-wide limiter) while the others wait for its answer instead of fetching too. A failed
/// fetch is not cached: the next caller tries again, behind the limiter.
#[derive(Default)]
pub(crate) struct TokenCache {
    current: tokio::sync::Mutex<Option<(String, Option<SystemTime>)>>,
}

/// How long before its expiry a token is replaced (yup-oauth2's own margin).
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

impl TokenCache {
    async fn get<F, Fut>(
        &self,
        limit: &DefaultDirectRateLimiter,
        fetch: F,
    ) -> Result<String, BqError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(String, Option<SystemTime>), BqError>>,
    {
        let mut current = self.current.lock().await;
        let fresh = |expires: &Option<SystemTime>| {
            expires.is_none_or(|t| t > SystemTime::now() + EXPIRY_MARGIN)
        };
        if let Some((token, expires)) = current.as_ref() {
            if fresh(expires) {
                return Ok(token.clone());
            }
        }
        limit.until_ready().await;
        let (token, expires) = fetch().await?;
        *current = Some((token.clone(), expires));
        Ok(token)
    }
}

/// Connection trouble reaching the token endpoint is transient; an answer refusing the key
/// (`invalid_grant`, a deleted key, …) means the credentials no longer work.
pub(crate) fn classify_token_error(e: yup_oauth2::Error) -> BqError {
    use yup_oauth2::Error as E;
    match e {
        E::HttpError(_) | E::HttpClientError(_) | E::LowLevelError(_) => {
            BqError::Transient(format!("token endpoint unreachable: {e}"))
        }
        E::AuthError(a) => {
            BqError::CredentialsRejected(format!("token endpoint refused the key: {:?}", a.error))
        }
        other => BqError::CredentialsRejected(format!("token request failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ServiceAccount, BqError> {
        parse_service_account(&SecretString::from(s.to_string()))
    }

    #[test]
    fn names_what_is_wrong_without_echoing() {
        let e = p("{not json").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = p(r#"{"type":"authorized_user","client_secret":"zzsecretzz"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("authorized_user") && !e.contains("zzsecretzz"),
            "{e}"
        );
        let e = p(r#"{"type":"service_account","client_email":"a@b"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("private_key, token_uri"), "{e}");
        let e = p(r#"{"type":"service_account","client_email":"a@b","token_uri":"x","private_key":"zzsecretzz"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PEM") && !e.contains("zzsecretzz"), "{e}");
    }

    fn policy(list: &str) -> TokenUriPolicy {
        TokenUriPolicy::allowing(list).unwrap()
    }

    fn refused(p: &TokenUriPolicy, uri: &str) -> String {
        match p.check(uri) {
            Ok(u) => panic!("{uri:?} was allowed as {u}"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("token_uri"),
                    "refusal does not name token_uri: {e}"
                );
                e
            }
        }
    }

    #[test]
    fn only_googles_token_endpoint_by_default() {
        let p = TokenUriPolicy::google_only();
        assert_eq!(
            p.check(GOOGLE_TOKEN_URI).unwrap().as_str(),
            GOOGLE_TOKEN_URI
        );
        assert_eq!(
            p.check("https://OAUTH2.googleapis.com:443/token")
                .unwrap()
                .as_str(),
            GOOGLE_TOKEN_URI
        );
        for uri in [
            "http://oauth2.googleapis.com/token",
            "https://oauth2.googleapis.com/other",
            "https://oauth2.googleapis.com:8443/token",
            "https://oauth2.googleapis.com.evil.example/token",
            "https://oauth2.googleapis.com./token",
            "https://evil.example/token",
            "http://169.254.169.254/computeMetadata/v1/",
            "http://metadata.google.internal/token",
            "http://127.0.0.1:9/token",
            "http://[::1]/token",
        ] {
            let e = refused(&p, uri);
            assert!(e.contains(ALLOW_HOSTS_VAR), "{e}");
        }
    }

    #[test]
    fn malformed_or_tricky_token_uris_are_refused_not_panicked_on() {
        let p = policy("127.0.0.1");
        for uri in [
            "",
            "token",
            "/token",
            "oauth2.googleapis.com/token",
            "http://",
            "https:///x",
        ] {
            refused(&p, uri);
        }
        let e = refused(&p, "https://oauth2.googleapis.com@169.254.169.254/token");
        assert!(e.contains("user name"), "{e}");
        refused(&p, "https://user:pw@oauth2.googleapis.com/token");
        let e = refused(&p, "file:///etc/passwd");
        assert!(e.contains("scheme"), "{e}");
        // The same address spelled as IPv4-mapped IPv6 is another host for the allow-list.
        refused(&p, "http://[::ffff:127.0.0.1]:8080/token");
        refused(&p, "http://[::ffff:a9fe:a9fe]/token");
        refused(&p, "http://127.0.0.2/token");
        // WHATWG parsing normalizes IPv4 spellings, so these are 127.0.0.1 itself (allowed) and
        // the metadata address (refused).
        assert_eq!(
            p.check("http://0x7f.0.0.1:8080/token").unwrap().as_str(),
            "http://127.0.0.1:8080/token"
        );
        refused(&p, "http://0xa9fea9fe/token");
        // Backslashes are path separators in the WHATWG parser; the normalized URL is what
        // the token request uses, so no other parser gets to read the original spelling.
        assert_eq!(
            p.check("http://127.0.0.1:8080\\@evil.example/token")
                .unwrap()
                .host_str(),
            Some("127.0.0.1")
        );
    }

    #[test]
    fn allow_list_entries_match_host_and_optional_port_exactly() {
        let p = policy(" 127.0.0.1 , token.internal.example:8443,[::1]:9000");
        assert!(p.check("http://127.0.0.1:1234/token").is_ok());
        assert!(p.check("https://token.internal.example:8443/t").is_ok());
        assert!(p.check("https://TOKEN.internal.example:8443/t").is_ok());
        refused(&p, "https://token.internal.example/t");
        refused(&p, "https://a.token.internal.example:8443/t");
        assert!(p.check("http://[::1]:9000/t").is_ok());
        refused(&p, "http://[::1]:9001/t");
        assert!(p.check(GOOGLE_TOKEN_URI).is_ok());
        // A port equal to the scheme's default is still a port restriction.
        let p = policy("h.example:80");
        assert!(p.check("http://h.example/t").is_ok());
        refused(&p, "https://h.example/t");
        for bad in ["::1", "a b", "user@host", "host/path", "http://host"] {
            assert!(TokenUriPolicy::allowing(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            TokenUriPolicy::allowing(" , ").unwrap(),
            TokenUriPolicy::google_only()
        );
    }

    /// A fake token endpoint: counts its fetches, answers `tok-N` valid for `valid`.
    async fn fetcher(
        calls: &std::sync::atomic::AtomicUsize,
        valid: Duration,
    ) -> Result<(String, Option<SystemTime>), BqError> {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok((format!("tok-{n}"), Some(SystemTime::now() + valid)))
    }

    fn limiter(burst: u32) -> DefaultDirectRateLimiter {
        RateLimiter::direct(Quota::per_hour(NonZeroU32::new(burst).unwrap()))
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_until_the_token_nears_expiry() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = TokenCache::default();
        let limit = limiter(10);
        let calls = AtomicUsize::new(0);
        let hour = Duration::from_secs(3600);
        let tokens =
            futures::future::join_all((0..50).map(|_| cache.get(&limit, || fetcher(&calls, hour))))
                .await;
        assert!(tokens.iter().all(|t| t.as_ref().unwrap() == "tok-0"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Within the margin of its expiry a token is replaced.
        let cache = TokenCache::default();
        let soon = Duration::from_secs(30);
        assert_eq!(
            cache.get(&limit, || fetcher(&calls, soon)).await.unwrap(),
            "tok-1"
        );
        assert_eq!(
            cache.get(&limit, || fetcher(&calls, soon)).await.unwrap(),
            "tok-2"
        );
        // A failed fetch is not kept: the next caller fetches again.
        let cache = TokenCache::default();
        let refused = cache
            .get(&limit, || async {
                Err(BqError::CredentialsRejected("refused".into()))
            })
            .await;
        assert!(refused.is_err());
        assert_eq!(
            cache.get(&limit, || fetcher(&calls, hour)).await.unwrap(),
            "tok-3"
        );
    }

    #[tokio::test]
    async fn fetches_past_the_limit_wait_for_it() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let limit = limiter(2);
        let calls = AtomicUsize::new(0);
        let hour = Duration::from_secs(3600);
        let (a, b, c) = (
            TokenCache::default(),
            TokenCache::default(),
            TokenCache::default(),
        );
        a.get(&limit, || fetcher(&calls, hour)).await.unwrap();
        b.get(&limit, || fetcher(&calls, hour)).await.unwrap();
        // The third tenant's fetch would exceed two an hour: it waits, nothing is sent.
        let third = tokio::time::timeout(
            Duration::from_millis(300),
            c.get(&limit, || fetcher(&calls, hour)),
        )
        .await;
        assert!(third.is_err(), "the third fetch went past the limit");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Cached tokens need no fetch, so the limit does not hold them up.
        let again = tokio::time::timeout(
            Duration::from_secs(5),
            a.get(&limit, || fetcher(&calls, hour)),
        )
        .await;
        assert_eq!(again.unwrap().unwrap(), "tok-0");
    }

    #[test]
    fn a_stored_key_wins_then_impersonation_then_only_the_emulator_goes_without() {
        let key = || Some(SecretString::from("{}".to_string()));
        let email = "a@p.iam.gserviceaccount.com";
        let of = Credentials::of_tenant;
        assert!(matches!(
            of(key(), Some(email), false),
            Some(Credentials::ServiceAccount(_))
        ));
        assert!(
            matches!(of(None, Some(email), true), Some(Credentials::Impersonated(e)) if e == email)
        );
        assert!(matches!(of(None, None, true), Some(Credentials::Emulator)));
        assert!(of(None, None, false).is_none());
    }

    #[test]
    fn debug_is_redacted() {
        let c = Credentials::ServiceAccount(SecretString::from("zzsecretzz".to_string()));
        assert!(!format!("{c:?}").contains("zzsecretzz"));
    }
}

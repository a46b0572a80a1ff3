//! OAuth 2.0 for stores that take only tokens (Microsoft 365, Gmail; Dovecot and Stalwart can
//! too): where a backend's token comes from ([`settings`]), the token endpoint ([`http`],
//! [`grants`]), users' sealed refresh tokens ([`store`]), and [`OAuthClient`], which hands out
//! access tokens from a cache kept until shortly before they expire, with one request at a time
//! per user (the others wait for it).

pub mod grants;
pub mod http;
pub mod settings;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grants::{ClientAuth, DeviceAnswer, Grant, OAuthError, TokenAnswer};
use settings::{AppGrant, OAuthSettings, Provider, SaslMechanism, TokenSource};
use store::{StoreError, TokenStore};

use crate::metrics::{metrics, Timer};

/// An access token, handed out from the cache.
pub type AccessToken = Arc<str>;

struct Cached {
    token: AccessToken,
    renew_at: Instant,
}

/// Most users whose tokens are kept at once (a bound on memory; expired ones go first).
const CACHE_USERS: usize = 100_000;

/// Access tokens by user (`""` for the application's own), each behind its own lock so that
/// only one request per user is in flight.
#[derive(Default)]
struct TokenCache {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
}

impl TokenCache {
    fn slot(&self, user: &str) -> Arc<tokio::sync::Mutex<Option<Cached>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() >= CACHE_USERS && !slots.contains_key(user) {
            // Slots no one waits on and whose token is gone or stale.
            let now = Instant::now();
            slots.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.try_lock()
                        .map(|c| c.as_ref().is_some_and(|c| c.renew_at > now))
                        .unwrap_or(true)
            });
            if slots.len() >= CACHE_USERS {
                slots.clear();
            }
        }
        Arc::clone(slots.entry(user.to_lowercase()).or_default())
    }
}

/// What polling the device grant said (RFC 8628 3.5).
pub enum DevicePoll {
    Pending,
    /// Poll less often (5 s more).
    SlowDown,
    Done(TokenAnswer),
}

/// One backend's OAuth client.
pub struct OAuthClient {
    tokens: TokenSource,
    mechanism: SaslMechanism,
    provider: &'static str,
    grant: AppGrant,
    token_url: Option<String>,
    device_url: Option<String>,
    client_id: String,
    issuer: String,
    scope: String,
    auth: ClientAuth,
    store: Option<TokenStore>,
    cache: TokenCache,
    timeout: Duration,
    margin: Duration,
}

impl OAuthClient {
    pub fn new(s: &OAuthSettings) -> Result<OAuthClient, OAuthError> {
        let client_id = s.client_id.clone().unwrap_or_default();
        let client = OAuthClient {
            tokens: s.tokens,
            mechanism: s.mechanism,
            provider: match s.provider {
                Provider::Custom => "custom",
                Provider::Microsoft => "microsoft",
                Provider::Google => "google",
            },
            grant: s.grant,
            token_url: s.token_url(),
            device_url: s.device_url(),
            issuer: s.client_email.clone().unwrap_or_else(|| client_id.clone()),
            client_id,
            scope: s.scope(),
            auth: match s.tokens {
                TokenSource::Client => ClientAuth::Public,
                _ => ClientAuth::load(
                    s.client_secret_file.as_deref(),
                    s.client_key_file.as_deref(),
                    s.client_key_id.as_deref(),
                )?,
            },
            store: s.token_store.as_deref().map(TokenStore::new),
            cache: TokenCache::default(),
            timeout: Duration::from_secs(s.http_timeout_secs),
            margin: Duration::from_secs(s.expiry_margin_secs),
        };
        client.initialize_series();
        Ok(client)
    }

    /// The token-request series this client can produce, at zero, so that rates and alerts
    /// see 0 before the first request.
    fn initialize_series(&self) {
        let grants: &[&str] = match (self.tokens, self.grant) {
            (TokenSource::Client, _) => &[],
            (TokenSource::App, AppGrant::ClientCredentials) => &["client_credentials"],
            (TokenSource::App, AppGrant::JwtBearer) => &["jwt_bearer"],
            (TokenSource::User, _) => &["refresh_token", "device_code"],
        };
        for grant in grants {
            for result in grants::RESULTS {
                metrics()
                    .oauth_token_requests
                    .with_label_values(&[self.provider, grant, result]);
            }
        }
    }

    pub fn tokens(&self) -> TokenSource {
        self.tokens
    }

    pub fn mechanism(&self) -> SaslMechanism {
        self.mechanism
    }

    pub fn store(&self) -> Option<&TokenStore> {
        self.store.as_ref()
    }

    /// `tokens = "app"`: a token to log `user` in with (the application's own with the client
    /// credentials grant, the user's with the JWT bearer grant).
    pub async fn app_token(&self, user: &str) -> Result<AccessToken, OAuthError> {
        let (key, grant) = match self.grant {
            AppGrant::ClientCredentials => ("", Grant::ClientCredentials { scope: &self.scope }),
            AppGrant::JwtBearer => (
                user,
                Grant::JwtBearer {
                    issuer: &self.issuer,
                    user,
                    scope: &self.scope,
                },
            ),
        };
        let slot = self.cache.slot(key);
        let mut cached = slot.lock().await;
        if let Some(token) = self.fresh(&cached) {
            return Ok(token);
        }
        let answer = self.request(&grant).await?;
        Ok(self.keep(&mut cached, &answer))
    }

    /// `tokens = "user"`: unlocks `user`'s refresh token with `password` (a wrong password
    /// fails here, whatever the cache holds) and hands out an access token, refreshing it
    /// when due; a rotated refresh token is sealed again before the new access token is used.
    pub async fn user_token(&self, user: &str, password: &str) -> Result<AccessToken, OAuthError> {
        let store = self
            .store
            .clone()
            .ok_or(OAuthError::Setup("no token_store configured".into()))?;
        let open = |store: TokenStore, user: String, password: String| async move {
            tokio::task::spawn_blocking(move || store.open(&user, &password))
                .await
                .map_err(|e| OAuthError::Setup(format!("key derivation task: {e}")))?
                .map_err(store_error)
        };
        // Proves the password (argon2id: off the async runtime).
        let refresh = open(store.clone(), user.to_owned(), password.to_owned()).await?;
        let slot = self.cache.slot(user);
        let mut cached = slot.lock().await;
        if let Some(token) = self.fresh(&cached) {
            return Ok(token);
        }
        // Another session may have rotated it while this one waited: read it again.
        let refresh = if cached.is_some() {
            open(store.clone(), user.to_owned(), password.to_owned()).await?
        } else {
            refresh
        };
        let answer = self
            .request(&Grant::Refresh {
                refresh_token: &refresh,
            })
            .await?;
        if let Some(rotated) = answer.refresh_token.as_deref().filter(|r| *r != refresh) {
            let (store, user_s, password_s, rotated) = (
                store.clone(),
                user.to_owned(),
                password.to_owned(),
                rotated.to_owned(),
            );
            tokio::task::spawn_blocking(move || store.seal(&user_s, &password_s, &rotated))
                .await
                .map_err(|e| OAuthError::Setup(format!("sealing task: {e}")))?
                .map_err(store_error)?;
        }
        Ok(self.keep(&mut cached, &answer))
    }

    /// The server refused `token`: forget it, so that the next login asks for a new one
    /// (unless another session already replaced it).
    pub async fn forget(&self, user: &str, token: &AccessToken) {
        let key = match (self.tokens, self.grant) {
            (TokenSource::App, AppGrant::ClientCredentials) => "",
            _ => user,
        };
        let slot = self.cache.slot(key);
        let mut cached = slot.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.token, token))
        {
            *cached = None;
        }
    }

    /// Starts the device authorization grant (RFC 8628 3.1).
    pub async fn device_start(&self) -> Result<DeviceAnswer, OAuthError> {
        let url = self
            .device_url
            .as_deref()
            .ok_or(OAuthError::Setup("no device_url for this provider".into()))?;
        let form = [
            ("client_id", self.client_id.as_str()),
            ("scope", self.scope.as_str()),
        ];
        let answer = http::post_form(url, &form, None, self.timeout).await?;
        grants::device_answer(&answer)
    }

    /// Polls the device grant once (RFC 8628 3.4, 3.5).
    pub async fn device_poll(&self, device_code: &str) -> Result<DevicePoll, OAuthError> {
        match self.request(&Grant::Device { device_code }).await {
            Ok(t) => Ok(DevicePoll::Done(t)),
            Err(OAuthError::Refused { error }) if error == "authorization_pending" => {
                Ok(DevicePoll::Pending)
            }
            Err(OAuthError::Refused { error }) if error == "slow_down" => Ok(DevicePoll::SlowDown),
            Err(e) => Err(e),
        }
    }

    fn fresh(&self, cached: &Option<Cached>) -> Option<AccessToken> {
        let m = metrics();
        match cached {
            Some(c) if c.renew_at > Instant::now() => {
                m.oauth_token_cache.with_label_values(&["hit"]).inc();
                Some(Arc::clone(&c.token))
            }
            _ => {
                m.oauth_token_cache.with_label_values(&["miss"]).inc();
                None
            }
        }
    }

    fn keep(&self, cached: &mut Option<Cached>, answer: &TokenAnswer) -> AccessToken {
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        let token: AccessToken = Arc::from(answer.access_token.as_str());
        *cached = Some(Cached {
            token: Arc::clone(&token),
            renew_at: Instant::now() + lifetime.saturating_sub(self.margin),
        });
        token
    }

    async fn request(&self, grant: &Grant<'_>) -> Result<TokenAnswer, OAuthError> {
        let m = metrics();
        let timer = Timer::start(&m.oauth_token_request_duration);
        let result = async {
            let url = self
                .token_url
                .as_deref()
                .ok_or(OAuthError::Setup("no token_url".into()))?;
            let form = grant.form(&self.auth, &self.client_id, url)?;
            let pairs: Vec<(&str, &str)> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let answer = http::post_form(url, &pairs, None, self.timeout).await?;
            grants::token_answer(&answer)
        }
        .await;
        drop(timer);
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        m.oauth_token_requests
            .with_label_values(&[self.provider, grant.label(), label])
            .inc();
        result
    }
}

fn store_error(e: StoreError) -> OAuthError {
    match e {
        StoreError::Missing => OAuthError::NoGrant("no refresh token stored"),
        StoreError::Sealed => OAuthError::NoGrant("the password does not open the stored grant"),
        other => OAuthError::Setup(other.to_string()),
    }
}

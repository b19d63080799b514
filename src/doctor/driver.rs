//! Runs the steps, in order, for each identity and account of a config, and
//! stops a chain at its first failure: endpoint, then token, then claims,
//! then one login per upstream. The judging is in the pure modules; this
//! file only does the requests and assembles the report.

use super::claims::{self, Expect};
use super::commands::{Credential, Ids};
use super::endpoint;
use super::entra::diagnose_token_error;
use super::exchange;
use super::report::{Check, Diagnosis, Report, Status, Step, Subject};
use crate::config::{AccountConfig, ClientCredential, Config, IdentityConfig, ListenerConfig};
use crate::protocol::Protocol;
use crate::token::entra::EntraClient;
use crate::token::provider::{self, ReauthNotifier, Source, SourceContext};
use crate::token::store::{unix_now, TokenStore};
use crate::token::{FreshToken, TokenError};
use std::sync::Arc;

/// An upstream the listeners use; listeners that share one are logged in once.
struct Target<'a> {
    listener: &'a ListenerConfig,
    names: Vec<String>,
}

fn targets(config: &Config) -> Vec<Target<'_>> {
    let mut out: Vec<Target> = Vec::new();
    for l in &config.listeners {
        match out.iter_mut().find(|t| {
            t.listener.protocol == l.protocol
                && t.listener.upstream == l.upstream
                && t.listener.upstream_tls == l.upstream_tls
        }) {
            Some(t) => t.names.push(l.name.clone()),
            None => out.push(Target { listener: l, names: vec![l.name.clone()] }),
        }
    }
    out
}

/// Each protocol the listeners use, with their names.
fn needs(targets: &[Target]) -> Vec<(Protocol, Vec<String>)> {
    let mut out: Vec<(Protocol, Vec<String>)> = Vec::new();
    for t in targets {
        match out.iter_mut().find(|(p, _)| *p == t.listener.protocol) {
            Some((_, names)) => names.extend(t.names.iter().cloned()),
            None => out.push((t.listener.protocol, t.names.clone())),
        }
    }
    out
}

fn identity_ids(config: &Config, identity: &IdentityConfig) -> Ids {
    let tenant = endpoint::split_token_url(&identity.token_url).map_or("", |(_, t)| t).to_string();
    Ids {
        config: config.source.display().to_string(),
        identity: identity.name.clone(),
        tenant_id: endpoint::is_guid(&tenant).then(|| tenant.clone()),
        tenant,
        client_id: Some(identity.client_id.clone()),
        flow: identity.flow,
        credential: match &identity.credential {
            ClientCredential::Secret(_) => Credential::Secret,
            ClientCredential::SecretFile(p) => Credential::SecretFile(p.display().to_string()),
            ClientCredential::Certificate { cert_file, .. } => Credential::Certificate(cert_file.display().to_string()),
            ClientCredential::None => Credential::None,
        },
        sp_object_id: None,
        account: None,
        mailbox: None,
        smtp_user: None,
        signed_in: None,
    }
}

fn with_account(ids: &Ids, account: &AccountConfig) -> Ids {
    Ids {
        account: Some(account.username.clone()),
        mailbox: Some(account.mailbox.clone()),
        smtp_user: Some(account.smtp_user.clone()),
        ..ids.clone()
    }
}

/// Tags a check with who it is about.
fn about(mut check: Check, ids: &Ids) -> Check {
    check.identity = Some(ids.identity.clone());
    check.account = ids.account.clone();
    check
}

/// Whether this process may write a path: the delegated checks write the
/// token store (rotated refresh tokens, the key on first use), and a file
/// root leaves in the service user's directory is one the service cannot
/// read. The CLI passes its ownership rule; `Ok` everywhere allows all.
pub type MayWrite<'a> = &'a dyn Fn(&std::path::Path) -> Result<(), String>;

/// Diagnoses every identity and account of `config` against the real
/// endpoints and upstreams it names.
pub async fn diagnose(config: &Config, may_write: MayWrite<'_>) -> Report {
    let mut report = Report::default();
    crate::tls::install_default_provider();
    let tls = match crate::tls::client_config(config.upstream_ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(e) => {
            report.push(Check::failed(
                Step::Prerequisites,
                format!("trust roots: {e}"),
                Diagnosis::new("upstream_ca_file cannot be used")
                    .note("it must be a readable PEM file of CA certificates"),
            ));
            return report;
        }
    };
    let delegated = config.identities.values().any(|i| i.flow == crate::config::Flow::RefreshToken);
    let mut store_refused = None;
    let writable = |s: &crate::config::TokenStoreConfig| {
        may_write(&s.path)?;
        match &s.key {
            crate::config::TokenStoreKey::File(key) => may_write(key),
            crate::config::TokenStoreKey::Inline(_) => Ok(()),
        }
    };
    let store = match &config.token_store {
        // App-only identities never touch the store: do not even create its key.
        _ if !delegated => None,
        None => None,
        Some(s) => match writable(s) {
            Err(message) => {
                report.push(Check::failed(
                    Step::Prerequisites,
                    format!("token store {}: not to be written by this user", s.path.display()),
                    Diagnosis::new(message.clone()),
                ));
                store_refused = Some(message);
                None
            }
            Ok(()) => match TokenStore::open(s) {
                Ok(store) => Some(Arc::new(store)),
                Err(e) => {
                    report.push(Check::failed(
                        Step::Prerequisites,
                        format!("token store {}: {e}", s.path.display()),
                        Diagnosis::new("delegated accounts cannot be checked without their stored refresh tokens")
                            .note("check token_store.path and its key: owner, modes 0700/0600, and that the key is the one the store was written with"),
                    ));
                    None
                }
            },
        },
    };

    if let Some(state) = &config.state {
        report.push(diagnose_state(state, config).await);
    }

    // The checks never run on_reauth_required: a human is watching already.
    let ctx = SourceContext {
        tls: tls.clone(),
        store,
        notifier: Arc::new(ReauthNotifier::new(None, &config.source)),
        shared: None,
    };
    let targets = targets(config);
    for identity in config.identities.values() {
        if identity.flow == crate::config::Flow::RefreshToken {
            if let Some(message) = &store_refused {
                let ids = identity_ids(config, identity);
                report.push(about(
                    Check::failed(
                        Step::Token,
                        "not checked: its accounts' tokens are in the token store",
                        Diagnosis::new(message.clone()),
                    ),
                    &ids,
                ));
                continue;
            }
        }
        diagnose_identity(config, identity, &ctx, &targets, &mut report).await;
    }
    report
}

/// `state:`: Redis answers, and this replica's token-store key is the
/// fleet's (the first replica to ask leaves a value sealed with its key).
async fn diagnose_state(state: &crate::config::StateConfig, config: &Config) -> Check {
    let url = state.display_url();
    let shared = match crate::state::SharedState::connect_quiet(state) {
        Ok(shared) => shared,
        Err(e) => return Check::failed(Step::State, format!("{url}: {e}"), Diagnosis::new("state: cannot be used")),
    };
    if let Err(e) = shared.ping().await {
        return Check::failed(
            Step::State,
            format!("redis at {url} does not answer: {e}"),
            Diagnosis::new("the replicas would serve with local state only (caps, throttle and tokens per replica)")
                .note("check state.url (host, port, database), the password (state.password, password_file or the URL) and, for rediss://, state.ca_file"),
        )
        .fact("url", url);
    }
    let Some(store_config) = &config.token_store else {
        return Check::ok(Step::State, format!("redis at {url} answers (prefix {})", state.prefix)).fact("url", url);
    };
    let store = match crate::token::store::TokenStore::open(store_config) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            return Check::failed(
                Step::State,
                format!("redis at {url} answers; the token store cannot be opened: {e}"),
                Diagnosis::default(),
            )
        }
    };
    let tokens = crate::token::shared::SharedTokens::new(shared, store);
    match tokens.key_matches().await {
        Ok(true) => Check::ok(
            Step::State,
            format!("redis at {url} answers (prefix {}); this token_store key is the fleet's", state.prefix),
        )
        .fact("url", url),
        Ok(false) => Check::failed(
            Step::State,
            format!("redis at {url} answers, but the fleet's tokens are sealed with another token_store key"),
            Diagnosis::new("replicas with different keys cannot read each other's tokens")
                .note("give every replica the same key: token_store.key: ${VAR} from one secret, or the same key_file"),
        )
        .fact("url", url),
        Err(e) => Check::failed(Step::State, format!("redis at {url}: {e}"), Diagnosis::default()).fact("url", url),
    }
}

async fn diagnose_identity(
    config: &Config,
    identity: &IdentityConfig,
    ctx: &SourceContext,
    targets: &[Target<'_>],
    report: &mut Report,
) {
    let mut ids = identity_ids(config, identity);
    report.identities.push(Subject {
        identity: identity.name.clone(),
        about: format!("{}, tenant {}, client_id {}", identity.flow.as_str(), ids.tenant, identity.client_id),
    });

    // 1. The token endpoint and the tenant.
    let Some(url) = endpoint::discovery_url(&identity.token_url) else {
        report.push(about(
            Check::failed(
                Step::Endpoint,
                format!("{} is not a token endpoint URL", identity.token_url),
                Diagnosis::default(),
            ),
            &ids,
        ));
        return;
    };
    let where_ = url.trim_end_matches("/v2.0/.well-known/openid-configuration").to_string();
    let client = match EntraClient::new(ctx.tls.clone(), provider::is_loopback_url(&url)) {
        Ok(c) => c,
        Err(e) => {
            report.push(about(Check::failed(Step::Endpoint, e.to_string(), Diagnosis::default()), &ids));
            return;
        }
    };
    match client.get(&url, identity.token_timeout).await {
        Err(failure) => {
            let d = endpoint::unanswered(&failure, &url, &ids);
            report.push(about(Check::failed(Step::Endpoint, format!("{where_}: {}", failure.detail), d), &ids));
            return;
        }
        Ok((status, body)) => match endpoint::judge(status, &body, &ids) {
            Ok(found) => {
                ids.tenant_id = found.tenant_id.clone().or(ids.tenant_id.take());
                let tid = ids.tenant_id.as_deref().unwrap_or("unknown");
                report.push(about(
                    Check::ok(Step::Endpoint, format!("{where_}: HTTP {status}, tenant exists (tenant ID {tid})"))
                        .fact("url", url.clone())
                        .fact("http_status", status)
                        .fact("tenant_id", tid),
                    &ids,
                ));
            }
            Err((summary, d)) => {
                report.push(about(
                    Check::failed(Step::Endpoint, format!("{where_}: {summary}"), d).fact("http_status", status),
                    &ids,
                ));
                return;
            }
        },
    }

    let source = match provider::source_for(identity, ctx) {
        Ok(s) => s,
        Err(e) => {
            let d = diagnose_token_error(&e, &ids);
            report.push(about(Check::failed(Step::Token, e.to_string(), d), &ids));
            return;
        }
    };
    let accounts: Vec<&AccountConfig> = config.accounts.iter().filter(|a| a.identity == identity.name).collect();
    match source {
        Source::App(app) => {
            // 2-3 once for the identity: every account shares its token.
            let Some((token, blocked)) = token_and_claims(app.fetch_new().await, identity, targets, &mut ids, report)
            else {
                return;
            };
            if accounts.is_empty() {
                report.push(about(
                    Check::new(Step::Login, Status::Warn, "no account uses this identity: no login tried"),
                    &ids,
                ));
            }
            for account in accounts {
                let ids = with_account(&ids, account);
                account_header(report, account);
                logins(&token, &blocked, targets, ctx, &ids, report).await;
            }
        }
        Source::Delegated(tokens) => {
            if accounts.is_empty() {
                report.push(about(
                    Check::new(Step::Token, Status::Warn, "no account uses this identity: no token to check"),
                    &ids,
                ));
            }
            for account in accounts {
                let mut ids = with_account(&ids, account);
                account_header(report, account);
                let fetched = tokens.fetch_with(&account.username, identity.min_token_lifetime).await;
                let Some((token, blocked)) = token_and_claims(fetched, identity, targets, &mut ids, report) else {
                    continue;
                };
                logins(&token, &blocked, targets, ctx, &ids, report).await;
            }
        }
    }
}

fn account_header(report: &mut Report, account: &AccountConfig) {
    let about = if account.smtp_user == account.mailbox {
        format!("mailbox {}", account.mailbox)
    } else {
        format!("mailbox {}, smtp_user {}", account.mailbox, account.smtp_user)
    };
    report.accounts.push((account.username.clone(), about));
}

/// Steps 2 and 3; the token and the protocols not to try, or `None` when the chain stops.
fn token_and_claims(
    fetched: Result<FreshToken, TokenError>,
    identity: &IdentityConfig,
    targets: &[Target<'_>],
    ids: &mut Ids,
    report: &mut Report,
) -> Option<(crate::secret::Secret<String>, Vec<Protocol>)> {
    let fresh = match fetched {
        Ok(fresh) => fresh,
        Err(e) => {
            let summary = match &e {
                TokenError::Entra(entra) => format!(
                    "HTTP {} {}: {}",
                    entra.status,
                    entra.error,
                    entra.description.lines().next().unwrap_or("").trim()
                ),
                other => other.to_string(),
            };
            report.push(about(Check::failed(Step::Token, summary, diagnose_token_error(&e, ids)), ids));
            return None;
        }
    };
    let expires_in = fresh.expires_in.as_secs();
    report.push(about(
        Check::ok(Step::Token, format!("issued, valid for {expires_in} s")).fact("expires_in", expires_in),
        ids,
    ));
    let expect = Expect {
        flow: identity.flow,
        scope: identity.scope.clone(),
        tenant_id: ids.tenant_id.clone(),
        needs: needs(targets),
        now: unix_now(),
        expires_in,
        min_lifetime: identity.min_token_lifetime.as_secs(),
    };
    let a = claims::assess(fresh.access_token.expose(), &expect, ids);
    let mut check = Check::new(Step::Claims, a.status, a.summary.clone());
    if let Some(c) = &a.claims {
        ids.sp_object_id = if ids.app_only() { c.oid.clone() } else { None };
        ids.signed_in = c.upn.clone();
        check = check
            .fact("aud", c.aud.clone())
            .fact("tid", c.tid.clone())
            .fact("roles", c.roles.clone())
            .fact("scp", c.scp.clone())
            .fact("exp", c.exp)
            .fact("remaining_secs", c.exp.map(|e| e as i64 - expect.now as i64));
    }
    if let Some(d) = a.diagnosis.clone() {
        check = check.with(d);
    }
    report.push(about(check, ids));
    if a.stop {
        return None;
    }
    Some((fresh.access_token, a.blocked))
}

/// Step 4 for one account: one login per upstream, except blocked protocols.
async fn logins(
    token: &crate::secret::Secret<String>,
    blocked: &[Protocol],
    targets: &[Target<'_>],
    ctx: &SourceContext,
    ids: &Ids,
    report: &mut Report,
) {
    for target in targets {
        let protocol = target.listener.protocol;
        if blocked.contains(&protocol) {
            continue;
        }
        let user = ids.login_user(protocol);
        let answer = super::login::login(target.listener, ctx.tls.clone(), user, ids.mailbox(), token.expose()).await;
        let head = format!("{protocol} {} as {user}", target.listener.upstream);
        let (said, reply) = match &answer {
            exchange::Answer::Accepted { detail } => (detail.clone(), None),
            exchange::Answer::Refused { reply, .. } | exchange::Answer::Temporary { reply, .. } => {
                (reply.clone(), Some(reply.clone()))
            }
            exchange::Answer::AfterLogin { command, reply } => {
                (format!("authenticated, then {command}: {reply}"), Some(reply.clone()))
            }
            exchange::Answer::Unreachable { detail } => (detail.clone(), None),
        };
        let mut check = match exchange::diagnose(protocol, &answer, ids) {
            None => Check::ok(Step::Login, format!("{head}: {said}")),
            Some((status, d)) => Check::new(Step::Login, status, format!("{head}: {said}")).with(d),
        };
        check.protocol = Some(protocol.to_string());
        check.listeners = target.names.clone();
        check = check.fact("upstream", target.listener.upstream.to_string()).fact("user", user);
        if let Some(reply) = reply {
            check = check.fact("reply", reply);
        }
        if let exchange::Answer::Refused { challenge: Some(c), .. } = &answer {
            check = check.fact("challenge", c.clone());
        }
        report.push(about(check, ids));
    }
}

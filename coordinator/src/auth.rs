//! Who is calling. Under mutual TLS a client is the identity its certificate proves (the
//! certificate's common name, and its SHA-256 fingerprint); where a device cannot hold a
//! certificate, the owner of the bearer token it presents ([`ClientTokens`]). A session token
//! is bound to the identity that joined with it, so it is worth nothing under another
//! identity; and an allow-list file, re-read when it changes, says which identities may take
//! part.
//!
//! The round engine never sees certificates: the service asks [`Gate`] before passing a call on.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use tracing::warn;

use crate::tokens::ClientTokens;
use crate::watched::Watched;

/// What stands for the fingerprint of a client known by its client token.
const TOKEN_FINGERPRINT: &str = "token:";

/// A client as its certificate (or its client token) names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate's common name (the kit's client name).
    pub name: String,
    /// SHA-256 of the certificate (DER), hex.
    pub fingerprint: String,
}

/// The identity of the caller's TLS client certificate; `None` without one (plaintext, or TLS
/// without client certificates).
pub fn peer_identity<T>(request: &Request<T>) -> Result<Option<Identity>, Status> {
    let Some(certs) = request.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| {
            Status::unauthenticated(
                "the client certificate has no common name: issue client certificates with `fedtune-coordinator provision`",
            )
        })?
        .to_string();
    let fingerprint = Sha256::digest(leaf.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Some(Identity { name, fingerprint }))
}

/// The allow-list: one client name or certificate fingerprint per line (`#` starts a comment).
/// Re-read whenever it changes, so removing a line refuses that client's next call without a
/// restart.
pub struct AllowList(Watched<HashSet<String>>);

impl AllowList {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self(Watched::open(path, "allow-list", |text| {
            Ok(text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(|l| l.to_ascii_lowercase())
                .collect())
        })?))
    }

    pub fn allows(&self, who: &Identity) -> bool {
        let list = self.0.current();
        list.contains(&who.name.to_ascii_lowercase()) || list.contains(&who.fingerprint)
    }
}

/// Why a call with a session token was refused.
pub enum Denial {
    /// The caller was taken off the allow-list since it joined: its session must end.
    NoLongerAllowed(Status),
    Refused(Status),
}

impl From<Denial> for Status {
    fn from(d: Denial) -> Self {
        match d {
            Denial::NoLongerAllowed(s) | Denial::Refused(s) => s,
        }
    }
}

/// The checks in front of the round engine.
pub struct Gate {
    /// Whether clients must prove who they are (a certificate or a client token).
    authenticated: bool,
    allow: Option<AllowList>,
    tokens: Option<ClientTokens>,
    /// Session token → the identity that joined with it.
    bound: Mutex<HashMap<String, Identity>>,
    /// Identities (certificate or token names) that may read the run's status.
    admins: HashSet<String>,
}

impl Gate {
    pub fn new(mutual_tls: bool, allow: Option<AllowList>, tokens: Option<ClientTokens>) -> Self {
        Self {
            authenticated: mutual_tls || tokens.is_some(),
            allow,
            tokens,
            bound: Mutex::new(HashMap::new()),
            admins: HashSet::new(),
        }
    }

    /// The identities that may call the `Admin` service when clients are authenticated.
    pub fn with_admins(mut self, admins: &[String]) -> Self {
        self.admins = admins.iter().cloned().collect();
        self
    }

    /// A call to the `Admin` service (the run's status, every client's name and state): when
    /// the coordinator authenticates clients, only an identity named in `admins` may make it;
    /// otherwise anyone who may join may also read it.
    pub fn admit_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.authenticated {
            return Ok(());
        }
        match self.identify(request)? {
            Some(id) if self.admins.contains(&id.name) => Ok(()),
            Some(id) => {
                warn!("refused a status request from `{}`: not an admin", id.name);
                Err(Status::permission_denied(format!(
                    "`{}` may not read the run's status: name it in the coordinator's `admins` (--admins)",
                    id.name
                )))
            }
            None => Err(Status::unauthenticated(
                "the run's status needs an admin's client certificate or client token (one named in the coordinator's --admins)",
            )),
        }
    }

    /// Who calls: the client certificate's identity, else the owner of the bearer token in
    /// `authorization` (when client tokens are configured), else nobody in particular.
    pub fn identify<T>(&self, request: &Request<T>) -> Result<Option<Identity>, Status> {
        if let Some(id) = peer_identity(request)? {
            return Ok(Some(id));
        }
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let Some(header) = request.metadata().get("authorization") else {
            return Ok(None);
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <client token>`")
            })?;
        let name = tokens.owner(token).ok_or_else(|| {
            warn!("refused a call with an unknown client token");
            Status::unauthenticated(
                "unknown client token: use the token `fedtune-coordinator token add` printed for this client (a deleted line revokes it)",
            )
        })?;
        let fingerprint = format!("{TOKEN_FINGERPRINT}{name}");
        Ok(Some(Identity { name, fingerprint }))
    }

    /// The identity a Join runs under: the certificate's (allowed) under mutual TLS, none
    /// otherwise.
    pub fn admit<T>(&self, request: &Request<T>) -> Result<Option<Identity>, Status> {
        let who = self.identify(request)?;
        match (&who, self.authenticated) {
            (None, true) => Err(Status::unauthenticated(
                "this coordinator requires a client certificate (mutual TLS) or a client token: run the client with its provisioned kit (--config DIR/client.toml) or --token-file",
            )),
            (Some(id), _) => {
                if let Some(allow) = &self.allow
                    && !allow.allows(id)
                {
                    warn!(
                        "refused client `{}` ({}): not on the allow-list",
                        id.name,
                        id.fingerprint.get(..16).unwrap_or(&id.fingerprint)
                    );
                    return Err(Status::permission_denied(format!(
                        "client `{}` is not on the coordinator's allow-list",
                        id.name
                    )));
                }
                Ok(who)
            }
            (None, false) => Ok(None),
        }
    }

    /// Remembers that `token` belongs to `who`.
    pub fn bind(&self, token: &str, who: Option<Identity>) {
        if let Some(who) = who {
            self.bound
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(token.to_string(), who);
        }
    }

    /// The identity that joined with session `token`.
    fn owner(&self, token: &str) -> Option<Identity> {
        self.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// Whether `token`'s session belongs to a client that joined with a client token that
    /// has since been deleted from the tokens file (revoked): its session must end, like that
    /// of a client taken off the allow-list.
    pub fn token_revoked(&self, token: &str) -> bool {
        let Some(tokens) = &self.tokens else {
            return false;
        };
        let owner = self.owner(token);
        owner
            .is_some_and(|o| o.fingerprint.starts_with(TOKEN_FINGERPRINT) && !tokens.names(&o.name))
    }

    /// Checks a call made with `token` by `caller` (from [`Gate::identify`]): the caller must
    /// be the identity that joined with it, and still allowed.
    pub fn check_caller(&self, caller: Option<Identity>, token: &str) -> Result<(), Denial> {
        let owner = self.owner(token);
        match (owner, caller) {
            (None, None) if !self.authenticated => Ok(()),
            (None, _) => Err(Denial::Refused(Status::unauthenticated(
                "unknown session: join first (the coordinator may have restarted)",
            ))),
            (Some(owner), Some(caller)) if owner.fingerprint == caller.fingerprint => {
                match &self.allow {
                    Some(allow) if !allow.allows(&caller) => {
                        warn!(
                            "refused client `{}`: removed from the allow-list",
                            caller.name
                        );
                        Err(Denial::NoLongerAllowed(Status::permission_denied(format!(
                            "client `{}` is no longer on the coordinator's allow-list",
                            caller.name
                        ))))
                    }
                    _ => Ok(()),
                }
            }
            (Some(owner), caller) => {
                let by = caller.map_or("a caller without a certificate".to_string(), |c| {
                    format!("client `{}`", c.name)
                });
                warn!(
                    "refused a session token of client `{}` presented by {by}",
                    owner.name
                );
                Err(Denial::Refused(Status::permission_denied(format!(
                    "this session belongs to client `{}`, not to {by}",
                    owner.name
                ))))
            }
        }
    }
}

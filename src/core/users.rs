//! Users of the front doors (SOCKS, HTTP proxy): a name and password per
//! user, the vnet the user routes in, and the vnets the user may pick by
//! logging in as `name@vnet`. The name is the flow's identity. Passwords
//! are compared in constant time and never logged or shown.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::core::config::{secret_text, ConfigError};
use crate::core::spine::reject::RejectReason;

/// One `users:` entry as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    name: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default)]
    vnets: Vec<String>,
}

/// One user.
#[derive(Clone, PartialEq)]
struct User {
    password: Vec<u8>,
    vnet: Option<String>,
    vnets: Vec<String>,
}

/// A door's users. `Debug` shows the names only.
#[derive(Clone, Default, PartialEq)]
pub struct Users(BTreeMap<String, User>);

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Users {
    /// Checks `users:` entries (`key`: `users[i]`), reading password files.
    pub fn from_raw(src: &str, raw: Vec<RawUser>) -> Result<Users, ConfigError> {
        let check_vnet = |key: String, v: &str| {
            configstore::check_name(v).map_err(|m| ConfigError::key(src, key, m))
        };
        let mut users = BTreeMap::new();
        for (i, u) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            if u.name.is_empty() || u.name.len() > 255 || u.name.contains(char::is_control) {
                return Err(ConfigError::key(
                    src,
                    key("name"),
                    "expected 1-255 printable characters (SOCKS sends at most 255 bytes)",
                ));
            }
            let password = secret_text(
                src,
                &key("password"),
                u.password,
                u.password_file,
                true,
                "the user's password",
            )?
            .expect("required");
            if password.is_empty() || password.len() > 255 {
                return Err(ConfigError::key(
                    src,
                    key("password"),
                    "expected 1-255 bytes (SOCKS sends at most 255)",
                ));
            }
            if let Some(v) = &u.vnet {
                check_vnet(key("vnet"), v)?;
            }
            for (j, v) in u.vnets.iter().enumerate() {
                check_vnet(format!("users[{i}].vnets[{j}]"), v)?;
            }
            if users.contains_key(&u.name) {
                return Err(ConfigError::key(
                    src,
                    key("name"),
                    format!("user `{}` is listed twice", u.name),
                ));
            }
            users.insert(
                u.name,
                User {
                    password: password.into_bytes(),
                    vnet: u.vnet,
                    vnets: u.vnets,
                },
            );
        }
        Ok(Users(users))
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The user names.
    pub fn names(&self) -> Vec<&String> {
        self.0.keys().collect()
    }

    /// Every vnet a user names (for start order).
    pub fn vnets(&self) -> impl Iterator<Item = &String> {
        self.0
            .values()
            .flat_map(|u| u.vnet.iter().chain(u.vnets.iter()))
    }

    /// Checks credentials. `user` may carry `@vnet`; an exact user name wins
    /// over that reading. Returns the identity and the vnet to route in
    /// (the user's, else `default_vnet`), or why not (a metric-safe reason;
    /// never the password).
    pub fn authenticate(
        &self,
        user: &str,
        password: &[u8],
        default_vnet: Option<&str>,
    ) -> Result<(String, Option<String>), RejectReason> {
        let (name, picked) = match self.0.get(user) {
            Some(_) => (user, None),
            None => match user.rsplit_once('@') {
                Some((n, v)) if self.0.contains_key(n) => (n, Some(v)),
                _ => return Err(RejectReason::UnknownUser),
            },
        };
        let u = &self.0[name];
        if !constant_time_eq(&u.password, password) {
            return Err(RejectReason::BadPassword);
        }
        let vnet = match picked {
            None => u.vnet.clone().or_else(|| default_vnet.map(str::to_string)),
            Some(v) if u.vnet.as_deref() == Some(v) || u.vnets.iter().any(|x| x == v) => {
                Some(v.to_string())
            }
            Some(_) => return Err(RejectReason::VnetNotAllowed),
        };
        Ok((name.to_string(), vnet))
    }
}

/// Compares two secrets without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

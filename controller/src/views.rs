//! The operator's views of stations and phones: the JSON objects of PROTOCOL §6's responses and
//! events, and the error codes the state machines' refusals are answered with. Kept out of the
//! pure state machines (`station`, `phone`), which know no wire format.

use fleet_protocol::CommandError;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::phone::{AuthState, Phone};
use crate::station::{Standing, Station};
use crate::times::rfc3339;
use crate::whitelist::{WhitelistEntry, Whitelists};

impl Station {
    /// The station object of operator responses (PROTOCOL §6).
    pub fn view(&self, online: bool) -> Value {
        let state = self.state(online);
        let mut view = Map::new();
        view.insert("serial".into(), json!(self.serial.as_str()));
        view.insert("model".into(), json!(self.model));
        view.insert("firmware".into(), json!(self.firmware));
        view.insert("mac_streaming".into(), json!(self.mac_streaming));
        view.insert("mac_control".into(), json!(self.mac_control));
        view.insert(
            "fingerprint".into(),
            json!(self.fingerprint.map(|fp| fp.to_string())),
        );
        view.insert("state".into(), json!(state.as_str()));
        view.insert("label".into(), json!(state.label()));
        view.insert("online".into(), json!(online));
        view.insert("last_seen".into(), json!(self.last_seen.and_then(rfc3339)));
        view.insert("ip".into(), json!(self.ip));
        view.insert(
            "last_mismatch".into(),
            json!(self.last_mismatch.and_then(rfc3339)),
        );
        match &self.standing {
            Standing::Unsupported { reason } => {
                view.insert("reason".into(), json!(reason));
            }
            Standing::Updating { version, .. } => {
                view.insert("update_version".into(), json!(version));
            }
            _ => {}
        }
        Value::Object(view)
    }
}

impl Phone {
    /// The phone object of operator responses (PROTOCOL §6).
    pub fn view(&self, now: OffsetDateTime) -> Value {
        let state = self.state_at(now);
        let mut view = Map::new();
        view.insert("mac".into(), json!(self.mac.as_str()));
        view.insert("vendor".into(), json!(self.vendor));
        view.insert("type".into(), json!(self.kind));
        view.insert("site".into(), json!(self.site));
        view.insert("created_at".into(), json!(rfc3339(self.created_at)));
        view.insert("auth_state".into(), json!(state.name()));
        view.insert("label".into(), json!(state.label()));
        if state != AuthState::Successful {
            if let Some(pap) = &self.pap {
                view.insert("pap".into(), json!(pap.as_str()));
            }
        }
        let suspended_until = self.suspended_until.filter(|until| *until > now);
        view.insert(
            "suspended_until".into(),
            json!(suspended_until.and_then(rfc3339)),
        );
        if let AuthState::Failed { until } = state {
            view.insert("failed_until".into(), json!(rfc3339(until)));
        }
        // How far the phone is towards a lockout, and towards the block.
        view.insert("failures".into(), json!(self.failures));
        view.insert("lockouts".into(), json!(self.lockouts));
        Value::Object(view)
    }
}

impl Whitelists {
    /// `listWhitelist` data (PROTOCOL §6): `{"permanent": [entry], "temporary": [{"ip",
    /// "expires_at"}]}`, without what has expired at `now`.
    pub fn list(&self, tenant: &str, now: OffsetDateTime) -> Value {
        let permanent: Vec<String> = self
            .permanent(tenant)
            .iter()
            .map(WhitelistEntry::to_string)
            .collect();
        let temporary: Vec<Value> = self
            .temporary(tenant, now)
            .map(|(ip, expires_at)| {
                json!({
                    "ip": ip.to_string(),
                    "expires_at": rfc3339(expires_at),
                })
            })
            .collect();
        json!({ "permanent": permanent, "temporary": temporary })
    }
}

impl From<crate::station::Refused> for CommandError {
    fn from(refused: crate::station::Refused) -> CommandError {
        use crate::station::Refused;
        match refused {
            Refused::WrongState(m) => CommandError::wrong_state(m),
            Refused::FingerprintMismatch(m) => CommandError::fingerprint_mismatch(m),
            Refused::InvalidArgument(m) => CommandError::invalid_argument(m),
        }
    }
}

impl From<crate::phone::Refused> for CommandError {
    fn from(refused: crate::phone::Refused) -> CommandError {
        CommandError::wrong_state(refused.0)
    }
}

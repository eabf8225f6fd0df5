//! Who may use the console: single-use, expiring login tokens (the link `fleetctl console`
//! prints) exchanged for a session cookie. Only SHA-256 digests of tokens and session ids are
//! kept, and looked up by digest, so that neither a comparison's timing nor a memory dump gives
//! one away. Pure: every call takes `now`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom as _, SystemRandom};
use sha2::{Digest as _, Sha256};

/// How long a login link may wait before it is used.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How long a session lasts after its login.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// Why a login token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Not a token this console issued, or one already used.
    #[error("this login link is not valid, or it was used already")]
    Unknown,
    /// Issued, but too long ago.
    #[error("this login link has expired")]
    Expired,
}

/// The random source failed (the system's CSPRNG): nothing can be issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct RandomError;

type Digest = [u8; 32];

#[derive(Default)]
struct Books {
    /// Unused login tokens: digest → when issued.
    tokens: HashMap<Digest, Instant>,
    /// Live sessions: digest of the cookie value → when it ends.
    sessions: HashMap<Digest, Instant>,
}

/// The console's logins. Its only state besides what fleetd holds.
pub struct Sessions {
    books: Mutex<Books>,
    random: SystemRandom,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            books: Mutex::new(Books::default()),
            random: SystemRandom::new(),
        }
    }
}

fn digest(secret: &str) -> Digest {
    Sha256::digest(secret.as_bytes()).into()
}

impl Sessions {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        // Every entry stands alone: a panic elsewhere cannot leave the maps inconsistent.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn secret(&self) -> Result<String, RandomError> {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).map_err(|_| RandomError)?;
        Ok(hex::encode(bytes))
    }

    /// A new login token, valid once, for [`TOKEN_LIFETIME`] from `now`.
    pub fn issue_token(&self, now: Instant) -> Result<String, RandomError> {
        let token = self.secret()?;
        let mut books = self.books();
        books
            .tokens
            .retain(|_, issued| now.saturating_duration_since(*issued) < TOKEN_LIFETIME);
        books.tokens.insert(digest(&token), now);
        Ok(token)
    }

    /// Spends `token` and opens a session: returns the session cookie's value.
    pub fn login(&self, token: &str, now: Instant) -> Result<String, LoginSessionError> {
        let mut books = self.books();
        let issued = books
            .tokens
            .remove(&digest(token))
            .ok_or(LoginSessionError::Login(LoginError::Unknown))?;
        if now.saturating_duration_since(issued) >= TOKEN_LIFETIME {
            return Err(LoginSessionError::Login(LoginError::Expired));
        }
        drop(books);
        let session = self.secret().map_err(LoginSessionError::Random)?;
        let mut books = self.books();
        books.sessions.retain(|_, ends| *ends > now);
        books
            .sessions
            .insert(digest(&session), now + SESSION_LIFETIME);
        Ok(session)
    }

    /// Whether `session` (a cookie value) is a live session.
    pub fn is_valid(&self, session: &str, now: Instant) -> bool {
        self.books()
            .sessions
            .get(&digest(session))
            .is_some_and(|ends| *ends > now)
    }

    /// Ends `session`.
    pub fn logout(&self, session: &str) {
        self.books().sessions.remove(&digest(session));
    }
}

/// Why [`Sessions::login`] opened no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginSessionError {
    #[error(transparent)]
    Login(LoginError),
    #[error(transparent)]
    Random(RandomError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_one_session_and_is_spent() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let token = sessions.issue_token(now).unwrap();
        assert_eq!(token.len(), 64);
        let session = sessions.login(&token, now).unwrap();
        assert!(sessions.is_valid(&session, now));
        assert_eq!(
            sessions.login(&token, now),
            Err(LoginSessionError::Login(LoginError::Unknown))
        );
        assert!(!sessions.is_valid(&token, now), "a token is not a session");
        assert!(!sessions.is_valid("", now));
        sessions.logout(&session);
        assert!(!sessions.is_valid(&session, now));
    }

    #[test]
    fn tokens_and_sessions_expire() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let token = sessions.issue_token(now).unwrap();
        assert_eq!(
            sessions.login(&token, now + TOKEN_LIFETIME),
            Err(LoginSessionError::Login(LoginError::Expired))
        );
        let token = sessions.issue_token(now).unwrap();
        let session = sessions.login(&token, now).unwrap();
        assert!(sessions.is_valid(&session, now + SESSION_LIFETIME - Duration::from_secs(1)));
        assert!(!sessions.is_valid(&session, now + SESSION_LIFETIME));
        assert_eq!(
            sessions.login("0".repeat(64).as_str(), now),
            Err(LoginSessionError::Login(LoginError::Unknown))
        );
    }
}

//! The diagnosis as data: one [`Check`] per step, rendered as text (one line
//! per step, the fix indented under it) or as one JSON document.

use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// The steps, in the order they run for each identity and account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// What the checks themselves need: trust roots, the token store.
    Prerequisites,
    /// The replicas' shared state (`state:`): Redis answers, the key matches.
    State,
    /// 1. The token endpoint answers (DNS, TLS, HTTP) and knows the tenant.
    Endpoint,
    /// 2. A token is issued.
    Token,
    /// 3. What the token says (audience, tenant, permissions, lifetime).
    Claims,
    /// 4. A real XOAUTH2 login to an upstream.
    Login,
}

impl Step {
    fn label(self) -> &'static str {
        match self {
            Step::Prerequisites => "local",
            Step::State => "state",
            Step::Endpoint => "endpoint",
            Step::Token => "token",
            Step::Claims => "claims",
            Step::Login => "login",
        }
    }
}

/// One line of a fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fix {
    /// What to do, or where the next lines go.
    Note(String),
    /// A line to paste as it is (PowerShell, a shell, a config key).
    Command(String),
}

/// A cause and what to do about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnosis {
    pub cause: String,
    pub fix: Vec<Fix>,
}

impl Diagnosis {
    pub fn new(cause: impl Into<String>) -> Self {
        Diagnosis { cause: cause.into(), fix: Vec::new() }
    }

    pub fn note(mut self, text: impl Into<String>) -> Self {
        self.fix.push(Fix::Note(text.into()));
        self
    }

    pub fn command(mut self, line: impl Into<String>) -> Self {
        self.fix.push(Fix::Command(line.into()));
        self
    }

    pub fn commands<I: IntoIterator<Item = String>>(mut self, lines: I) -> Self {
        self.fix.extend(lines.into_iter().map(Fix::Command));
        self
    }

    /// Appends another diagnosis's fix (its cause becomes a note).
    pub fn and(mut self, other: Diagnosis) -> Self {
        if !other.cause.is_empty() {
            self.fix.push(Fix::Note(other.cause));
        }
        self.fix.extend(other.fix);
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub step: Step,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<String>,
    /// What was checked and what was found, in one line.
    pub summary: String,
    /// Why it failed or deserves attention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fix: Vec<Fix>,
    /// Facts for scripts: claims by name, HTTP status, seconds left...
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub facts: serde_json::Map<String, serde_json::Value>,
}

impl Check {
    pub fn new(step: Step, status: Status, summary: impl Into<String>) -> Self {
        Check {
            step,
            status,
            identity: None,
            account: None,
            protocol: None,
            listeners: Vec::new(),
            summary: summary.into(),
            cause: None,
            fix: Vec::new(),
            facts: serde_json::Map::new(),
        }
    }

    pub fn ok(step: Step, summary: impl Into<String>) -> Self {
        Check::new(step, Status::Ok, summary)
    }

    pub fn failed(step: Step, summary: impl Into<String>, diagnosis: Diagnosis) -> Self {
        Check::new(step, Status::Fail, summary).with(diagnosis)
    }

    pub fn with(mut self, diagnosis: Diagnosis) -> Self {
        if !diagnosis.cause.is_empty() {
            self.cause = Some(diagnosis.cause);
        }
        self.fix.extend(diagnosis.fix);
        self
    }

    pub fn fact(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.facts.insert(key.to_string(), value.into());
        self
    }
}

/// Who a run of checks is about, for the text headers.
#[derive(Debug, Clone, Serialize)]
pub struct Subject {
    pub identity: String,
    /// e.g. `client_credentials, tenant contoso.onmicrosoft.com, client_id ...`
    pub about: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Header lines for identities and accounts, keyed by name.
    #[serde(skip)]
    pub identities: Vec<Subject>,
    #[serde(skip)]
    pub accounts: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: usize,
    pub warnings: usize,
    pub failed: usize,
}

impl Report {
    pub fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for check in &self.checks {
            match check.status {
                Status::Ok => c.ok += 1,
                Status::Warn => c.warnings += 1,
                Status::Fail => c.failed += 1,
            }
        }
        c
    }

    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// One line per check under identity and account headers; the cause and
    /// fix indented under a check that is not ok.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let mut identity: Option<&str> = None;
        let mut account: Option<&str> = None;
        for check in &self.checks {
            if check.identity.as_deref() != identity {
                identity = check.identity.as_deref();
                account = None;
                if let Some(name) = identity {
                    let about = self.identities.iter().find(|s| s.identity == name).map(|s| s.about.as_str());
                    let _ = match about {
                        Some(about) => writeln!(out, "identity {name:?} ({about})"),
                        None => writeln!(out, "identity {name:?}"),
                    };
                }
            }
            if check.account.as_deref() != account {
                account = check.account.as_deref();
                if let Some(name) = account {
                    let about = self.accounts.iter().find(|(n, _)| n == name).map(|(_, a)| a.as_str());
                    let _ = match about {
                        Some(about) => writeln!(out, "  account {name:?} ({about})"),
                        None => writeln!(out, "  account {name:?}"),
                    };
                }
            }
            let indent = match (&check.identity, &check.account) {
                (None, _) => "",
                (Some(_), None) => "  ",
                (Some(_), Some(_)) => "    ",
            };
            let _ = writeln!(out, "{indent}{:<4} {:<8}  {}", check.status.label(), check.step.label(), check.summary);
            let under = format!("{indent}       ");
            if let Some(cause) = &check.cause {
                let _ = writeln!(out, "{under}{cause}");
            }
            for (i, line) in check.fix.iter().enumerate() {
                let lead = if i == 0 { "fix: " } else { "     " };
                let _ = match line {
                    Fix::Note(text) => writeln!(out, "{under}{lead}{text}"),
                    Fix::Command(text) => writeln!(out, "{under}{lead}  {text}"),
                };
            }
        }
        let c = self.counts();
        let _ = writeln!(out, "{} ok, {} warning(s), {} failed", c.ok, c.warnings, c.failed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_one_line_per_step_with_the_fix_indented() {
        let mut report = Report::default();
        report.identities.push(Subject { identity: "contoso".into(), about: "client_credentials".into() });
        report.accounts.push(("printer".into(), "mailbox a@b.c".into()));
        let mut ok = Check::ok(Step::Token, "issued, valid for 3599 s");
        ok.identity = Some("contoso".into());
        report.push(ok);
        let mut failed = Check::failed(
            Step::Login,
            "smtp host:587 as a@b.c: 535 5.7.139 ...",
            Diagnosis::new("SMTP AUTH is disabled for the tenant.")
                .note("in Exchange Online PowerShell:")
                .command("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
        );
        failed.identity = Some("contoso".into());
        failed.account = Some("printer".into());
        report.push(failed);
        assert_eq!(
            report.render_text(),
            "identity \"contoso\" (client_credentials)\n\
             \x20 ok   token     issued, valid for 3599 s\n\
             \x20 account \"printer\" (mailbox a@b.c)\n\
             \x20   FAIL login     smtp host:587 as a@b.c: 535 5.7.139 ...\n\
             \x20          SMTP AUTH is disabled for the tenant.\n\
             \x20          fix: in Exchange Online PowerShell:\n\
             \x20                 Set-TransportConfig -SmtpClientAuthenticationDisabled $false\n\
             1 ok, 0 warning(s), 1 failed\n"
        );
        assert!(report.failed());
    }

    #[test]
    fn json_names_steps_and_statuses_in_lower_case() {
        let check = Check::failed(Step::Claims, "s", Diagnosis::new("c").command("x")).fact("aud", "a");
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(json["step"], "claims");
        assert_eq!(json["status"], "fail");
        assert_eq!(json["fix"][0]["command"], "x");
        assert_eq!(json["facts"]["aud"], "a");
        assert!(json.get("account").is_none());
    }
}

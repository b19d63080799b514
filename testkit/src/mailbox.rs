//! An in-memory mailbox shared by the fake servers in "mailbox" mode: what
//! SMTP delivers, IMAP and POP3 can read back.

use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct Message {
    pub uid: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Mailbox {
    messages: Mutex<Vec<Message>>,
    next_uid: Mutex<u32>,
    /// Woken on every delivery (IMAP IDLE).
    pub arrived: Notify,
}

impl Mailbox {
    pub fn new() -> Self {
        Mailbox::default()
    }

    pub fn deliver(&self, data: Vec<u8>) -> u32 {
        let uid = {
            let mut next = self.next_uid.lock().unwrap();
            *next += 1;
            *next
        };
        self.messages.lock().unwrap().push(Message { uid, data });
        self.arrived.notify_waiters();
        uid
    }

    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    pub fn remove(&self, uids: &[u32]) {
        self.messages.lock().unwrap().retain(|m| !uids.contains(&m.uid));
    }
}

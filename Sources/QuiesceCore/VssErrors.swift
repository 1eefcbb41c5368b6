/// VSS's error codes by name, and writer states by number: the words reasons are made of.
public enum VssErrors {
    /// VSS cancels a hold of writes after 10 s (VSS_E_HOLD_WRITES_TIMEOUT).
    public static let holdLimitMs: UInt32 = 10_000

    public static let codes: [String: UInt32] = [
        "VSS_E_BAD_STATE": 0x8004_2301,
        "VSS_E_UNEXPECTED": 0x8004_230F,
        "VSS_E_OBJECT_NOT_FOUND": 0x8004_2308,
        "VSS_E_VOLUME_NOT_SUPPORTED": 0x8004_230C,
        "VSS_E_SNAPSHOT_SET_IN_PROGRESS": 0x8004_2316,
        "VSS_E_FLUSH_WRITES_TIMEOUT": 0x8004_2313,
        "VSS_E_HOLD_WRITES_TIMEOUT": 0x8004_2314,
        "VSS_E_WRITER_NOT_RESPONDING": 0x8004_2319,
        "VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT": 0x8004_23F0,
        "VSS_E_WRITERERROR_OUTOFRESOURCES": 0x8004_23F1,
        "VSS_E_WRITERERROR_TIMEOUT": 0x8004_23F2,
        "VSS_E_WRITERERROR_RETRYABLE": 0x8004_23F3,
        "VSS_E_WRITERERROR_NONRETRYABLE": 0x8004_23F4,
    ]

    public static func code(of name: String) -> UInt32? { Self.codes[name] }

    /// "VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)".
    public static func describe(_ name: String, code: UInt32? = nil) -> String {
        guard let code = code ?? Self.codes[name], code != 0 else { return name }
        return "\(name) (0x\(String(code, radix: 16, uppercase: true)))"
    }

    /// VSS_WRITER_STATE, without its VSS_WS_ prefix.
    public static let states: [UInt32: String] = [
        0: "UNKNOWN", 1: "STABLE", 2: "WAITING_FOR_FREEZE", 3: "WAITING_FOR_THAW", 4: "WAITING_FOR_POST_SNAPSHOT",
        5: "WAITING_FOR_BACKUP_COMPLETE", 6: "FAILED_AT_IDENTIFY", 7: "FAILED_AT_PREPARE_BACKUP", 8: "FAILED_AT_PREPARE_SNAPSHOT",
        9: "FAILED_AT_FREEZE", 10: "FAILED_AT_THAW", 11: "FAILED_AT_POST_SNAPSHOT", 12: "FAILED_AT_BACKUP_COMPLETE",
        13: "FAILED_AT_PRE_RESTORE", 14: "FAILED_AT_POST_RESTORE", 15: "FAILED_AT_BACKUPSHUTDOWN",
    ]
}

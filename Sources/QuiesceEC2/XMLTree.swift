import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

/// An EC2 reply as a small tree: element names without namespaces, text, children.
public struct XMLTree: Sendable, Equatable {
    public var name: String
    public var text: String
    public var children: [XMLTree]

    /// The first child named `name`.
    public func child(_ name: String) -> XMLTree? { self.children.first { $0.name == name } }
    /// The text of the child at `path` ("snapshotId", "attachmentSet/item/device").
    public func value(_ path: String) -> String? {
        var node: XMLTree? = self
        for part in path.split(separator: "/") { node = node?.child(String(part)) }
        return node?.text.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    /// The `item`s of a `…Set` child (EC2's lists).
    public func items(_ set: String) -> [XMLTree] { self.child(set)?.children.filter { $0.name == "item" } ?? [] }
    /// A `tagSet` as a dictionary.
    public var tags: [String: String] {
        Dictionary(self.items("tagSet").compactMap { item in item.value("key").map { ($0, item.value("value") ?? "") } }, uniquingKeysWith: { $1 })
    }

    /// Parses `data`; nil when it is not XML.
    public static func parse(_ data: Data) -> XMLTree? {
        let builder = Builder()
        let parser = XMLParser(data: data)
        parser.delegate = builder
        guard parser.parse(), let root = builder.root else { return nil }
        return root
    }

    private final class Builder: NSObject, XMLParserDelegate {
        var stack: [XMLTree] = []
        var root: XMLTree?

        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
            self.stack.append(XMLTree(name: name.split(separator: ":").last.map(String.init) ?? name, text: "", children: []))
        }

        func parser(_ parser: XMLParser, foundCharacters string: String) {
            if !self.stack.isEmpty { self.stack[self.stack.count - 1].text += string }
        }

        func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
            guard let done = self.stack.popLast() else { return }
            if self.stack.isEmpty { self.root = done } else { self.stack[self.stack.count - 1].children.append(done) }
        }
    }
}

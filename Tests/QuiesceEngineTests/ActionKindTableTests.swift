import QuiesceEngine
import QuiescePlugins
import Testing

@Suite("The action-kind table, the engine's half")
struct ActionKindTableTests {
    @Test("every kind the plugin contract knows has a performer in the engine, and nothing else does")
    func performers() {
        #expect(PlanRunner.performedKinds == Set(ActionKind.all.map(\.name)))
    }
}

from services.common.stage_main import main
from services.gen.cfrseg.v1 import retrain_pb2_grpc
from services.retrain.servicer import RetrainServicer

if __name__ == "__main__":
    main("retrain", "cfrseg.v1.RetrainService", retrain_pb2_grpc.add_RetrainServiceServicer_to_server,
         "services.retrain.stage:run", servicer_cls=RetrainServicer)
